"""The README stays true: every setting, CLI command and route is documented; .ci/run runs the README's tests."""

from pathlib import Path

from kyutai_stt.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    missing = [f"KYUTAI_STT_{name.upper()}" for name in Settings.model_fields if f"KYUTAI_STT_{name.upper()}" not in README]
    assert not missing, f"README lacks {missing}"


def route_paths(routes, prefix: str = ""):
    """Every path an app serves. Newer FastAPI keeps an included router as one ``_IncludedRouter`` entry in
    ``app.routes`` (its routes inside), older ones flatten them: walk both."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from route_paths(included.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
        elif getattr(route, "path", None):
            yield prefix + route.path


def test_every_route_is_documented(checkpoint_dir):
    from kyutai_stt.serve.server import create_app

    app = create_app(Settings(model=str(checkpoint_dir), device="cpu"))
    paths = set(route_paths(app.routes))
    assert {"/v1/stream", "/v1/listen", "/api/asr-streaming"} <= paths  # the routers' routes were seen
    paths = {p for p in paths if not p.startswith(("/docs", "/openapi", "/redoc", "/static"))}
    missing = [p for p in paths if f"`{p}`" not in README and f" {p}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_command_is_documented():
    from kyutai_stt.cli import app

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert names and all(f"kyutai-stt {n}" in README for n in names)


def test_ci_runs_the_readme_test_command():
    assert "uv run pytest" in README
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "uv run pytest"
