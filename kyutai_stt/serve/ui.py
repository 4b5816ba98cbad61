"""The browser page: live transcription from the microphone and file transcription, served by us, offline.

The page is a FastHTML app with no CDN headers: every asset (CSS, the hand-written JS under ``static/``) is
served from this package. It talks to the STT server over ``WS /v1/stream`` (JSON events), so it can run

* inside the STT server (``kyutai-stt serve`` serves it at ``/``, see ``mount_ui``), or
* on its own, pointed at an STT server elsewhere: ``create_ui_app("https://stt.example.org")`` is a standalone
  ASGI app (``python -m kyutai_stt.serve.ui --stt-url https://stt.example.org``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fasthtml.common import (Body, Button, Div, FastHTML, Footer, H1, H2, Head, Header, Html, Input, Link,
                             Main, Meta, Noscript, P, Script, Section, Span, Title)
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
TITLE = "kyutai-stt: live transcription"


class _Static(StaticFiles):
    """Static files that browsers revalidate (ETag) on each load, so a new release is picked up at once."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def static_files() -> StaticFiles:
    return _Static(directory=STATIC_DIR)


def page(stt_url: str | None = None) -> Html:
    """The whole page. ``stt_url`` is the STT server's base URL (http(s) or ws(s)); empty: this page's origin.

    Asset URLs are relative, so the page also works below a path prefix (behind a proxy).
    """
    downloads = [Button(fmt, type="button", cls="small", data_format=fmt, disabled=True,
                        aria_label=f"Download the transcript as {label}") for fmt, label in
                 (("txt", "plain text"), ("srt", "SRT subtitles"), ("vtt", "WebVTT subtitles"), ("json", "JSON"))]
    return Html(
        Head(
            Meta(charset="utf-8"),
            Meta(name="viewport", content="width=device-width, initial-scale=1, viewport-fit=cover"),
            Meta(name="color-scheme", content="light dark"),
            Meta(name="kyutai-stt-url", content=stt_url or ""),
            Title(TITLE),
            Link(rel="icon", href="static/icon.svg", type="image/svg+xml"),
            Link(rel="stylesheet", href="static/style.css"),
        ),
        Body(
            Header(
                H1("kyutai-stt", Span(" live transcription", cls="subtitle")),
                Span("idle", id="state", cls="state", data_state="idle", role="status", aria_live="polite",
                     title="Connection state"),
                cls="top",
            ),
            Main(
                Div(id="notice", cls="notice", role="alert", hidden=True),
                Div(id="warning", cls="notice warn", hidden=True),
                Noscript(P("This page needs JavaScript for the microphone and the connection to the server.",
                           cls="notice")),
                Section(
                    Button(Span("●", cls="dot", aria_hidden="true"), Span("Start", cls="label"), id="record",
                           type="button", cls="primary", aria_pressed="false",
                           aria_label="Start transcribing the microphone"),
                    Div(Div(id="level-bar", cls="level-bar"), id="level", cls="level", role="meter",
                        aria_label="Microphone level", aria_valuemin="0", aria_valuemax="100", aria_valuenow="0"),
                    Span("0:00", id="elapsed", cls="elapsed", aria_label="Recording time"),
                    cls="controls", aria_label="Microphone",
                ),
                Section(
                    Button("Transcribe a file…", id="upload", type="button",
                           aria_describedby="upload-hint"),
                    Input(id="file", type="file", accept="audio/*,video/*,.wav,.mp3,.flac,.ogg,.opus,.m4a,.webm",
                          hidden=True, tabindex="-1"),
                    Span("or drop an audio file on the page", id="upload-hint", cls="hint"),
                    Div(Div(Div(id="progress-bar", cls="progress-bar"), id="progress", cls="progress",
                            role="progressbar", aria_label="File progress", aria_valuemin="0", aria_valuemax="100",
                            aria_valuenow="0"),
                        Span("", id="progress-text", cls="progress-text", aria_live="polite"),
                        id="progress-row", cls="progress-row", hidden=True),
                    cls="file", aria_label="File",
                ),
                Section(
                    H2("Transcript", cls="visually-hidden"),
                    Div(P("Press Start and speak, or transcribe a file. Words appear as they are recognised; "
                          "hover a word to see its time.", cls="placeholder"),
                        id="transcript", cls="transcript", aria_live="polite", aria_relevant="additions",
                        tabindex="0", aria_label="Transcript"),
                    Div(Span("Download", cls="hint"), *downloads,
                        Button("Clear", id="clear", type="button", cls="small", disabled=True),
                        cls="actions"),
                    cls="output",
                ),
            ),
            Footer(Span("", id="server-info"), Span("", id="audio-info"), cls="bottom"),
            Script(type="module", src="static/app.js"),
        ),
        lang="en",
    )


def create_ui_app(stt_url: str | None = None) -> FastHTML:
    """The page as a standalone ASGI app, pointed at the STT server ``stt_url`` (``None``: the same origin).

    FastHTML's default headers (htmx, surreal, fasthtml.js from a CDN) and its session middleware are turned
    off: the page loads nothing from elsewhere and keeps no state on the server.
    """
    app = FastHTML(default_hdrs=False, sess_cls=None, secret_key=secrets.token_hex(16), canonical=False,
                   title=TITLE)

    @app.get("/")
    def index():
        return page(stt_url)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    app.routes.append(Mount("/static", static_files(), name="static"))
    return app


def mount_ui(app, stt_url: str | None = None) -> None:
    """Serve the page at ``/`` and its assets at ``/static`` on an existing Starlette/FastAPI app.

    Only these two paths are claimed (no catch-all mount), so routes added later still work.
    """
    ui = create_ui_app(stt_url)
    app.router.routes.append(Route("/", ui, methods=["GET", "HEAD"], include_in_schema=False))
    app.router.routes.append(Mount("/static", static_files(), name="static"))


def main(argv: list[str] | None = None) -> None:
    """``python -m kyutai_stt.serve.ui --stt-url URL``: serve the page alone, pointed at an STT server."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--stt-url", default=None, help="Base URL of the STT server (default: the page's origin).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(create_ui_app(args.stt_url), host=args.host, port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
