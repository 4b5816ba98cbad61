"""The house's shape is checked, not hoped for: the import rules of pyproject.toml (layers, no torch in the client
and the wire messages, moshi only inside the Kyutai family) and no import circle anywhere in the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def circles(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """Every direct import a -> b for which b also reaches a: the edges that close a circle."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if graph.find_shortest_chain(importer=imported, imported=importer):
                found.append((importer, imported))
    return found


def test_no_import_circle():
    graph = grimp.build_graph("kyutai_stt", include_external_packages=False)
    assert circles(graph) == []


def test_a_circle_is_seen():
    """The check above can fail: one import added the wrong way round is reported."""
    graph = grimp.build_graph("kyutai_stt", include_external_packages=False)
    graph.add_import(importer="kyutai_stt.audio.constants", imported="kyutai_stt.settings")
    graph.add_import(importer="kyutai_stt.settings", imported="kyutai_stt.audio.constants")
    assert ("kyutai_stt.audio.constants", "kyutai_stt.settings") in circles(graph)
