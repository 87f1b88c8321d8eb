"""processor/compiled.py: the mypyc builds are used when asked for, never stale, and optional.

That the compiled modules behave as the interpreted ones is checked by running their tests compiled
(`make test`'s second pass, GUARDSTREAM_COMPILED=1); these check the build and the import routing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from processor import compiled

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **environment: str) -> dict:
    """`code` in a fresh interpreter (imports start empty there); its last stdout line, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=os.environ | environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_activated_modules_are_imported_compiled_and_the_rest_as_source():
    answer = run_python(
        "import json, sys\n"
        "from processor import compiled\n"
        "activated = compiled.activate()\n"
        "import processor.worker.worker\n"  # the worker's imports reach every compiled module
        "names = [*compiled.HOT_MODULES, 'processor.worker.events', 'processor.engine.async_engine']\n"
        "print(json.dumps({'activated': activated, 'compiled': {n: compiled.is_compiled(n) for n in names}}))"
    )
    assert answer["activated"] is True
    assert answer["compiled"] == {
        **dict.fromkeys(compiled.HOT_MODULES, True),
        "processor.worker.events": False,  # pydantic models: left interpreted
        "processor.engine.async_engine": False,
    }


def test_activating_after_an_import_keeps_the_interpreted_modules():
    answer = run_python(
        "import json\n"
        "import processor.worker.verdicts\n"
        "from processor import compiled\n"
        "print(json.dumps([compiled.activate(), compiled.is_compiled('processor.worker.verdicts')]))"
    )
    assert answer == [False, False]


def test_an_edited_source_gets_a_build_of_its_own():
    sources = [compiled._source(name).read_bytes() for name in compiled.HOT_MODULES]
    key = compiled.build_key(sources, "1.0")
    assert compiled.build_key(sources, "1.0") == key
    edited = [sources[0] + b"\n# an edit\n", *sources[1:]]
    assert compiled.build_key(edited, "1.0") != key
    assert compiled.build_key(sources, "1.1") != key  # another mypy may compile differently


def test_the_build_writes_nothing_beside_the_sources(tmp_path):
    before = sorted(path for path in (ROOT / "processor").rglob("*") if "__pycache__" not in path.parts)
    folder = compiled.build(tmp_path / "cache")
    after = sorted(path for path in (ROOT / "processor").rglob("*") if "__pycache__" not in path.parts)
    assert after == before
    assert folder.parent == tmp_path / "cache" and len(list(folder.rglob("*__mypyc*"))) == 1
    assert compiled.build(tmp_path / "cache") == folder  # built once, then found


def test_without_mypy_the_modules_stay_interpreted(monkeypatch, tmp_path):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(compiled.CompileUnavailableError, match="mypy"):
        compiled.build(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_cache_it_cannot_write_leaves_the_modules_interpreted(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(compiled.CompileUnavailableError, match="could not build"):
        compiled.build(not_a_folder / "cache")


def test_a_build_that_does_not_load_is_backed_out(tmp_path):
    """A build that fails to load (here: one module's library replaced by bytes no loader takes) must
    not stop a worker: activate says False and every module imports as source."""
    built = compiled.build()  # the shared cache (make test builds it first)
    damaged = tmp_path / built.name
    shutil.copytree(built, damaged)
    library = next((damaged / "processor" / "worker").glob("verdicts.*"))
    library.write_bytes(b"not a shared library")
    answer = run_python(
        "import json\n"
        "from pathlib import Path\n"
        "from processor import compiled\n"
        f"activated = compiled.activate(Path({str(tmp_path)!r}))\n"
        "import processor.worker.worker\n"
        "print(json.dumps([activated, *(compiled.is_compiled(n) for n in compiled.HOT_MODULES)]))"
    )
    assert answer == [False, *[False] * len(compiled.HOT_MODULES)]
