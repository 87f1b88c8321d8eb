"""tests/test_faust_records.py in an environment with faust-streaming, where this one has none.

faust-streaming pins click<8.4, which the project's own environment (current transformers) cannot
take, so `.[dev]` leaves faust out. This test builds a virtual environment of its own with the
`faust` extra's requirement (cached, built once), layers this environment's packages beneath it (a
.pth file: faust's own pins win), and runs the faust tests there against this session's broker.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import site
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.local.kafka import cache_root

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


def faust_requirement() -> str:
    """The `faust` extra's requirement, as pyproject.toml states it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = project["optional-dependencies"]["faust"]
    return requirement


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def faust_environment() -> Path:
    """The python of a virtual environment holding faust-streaming, over this environment's packages."""
    requirement = faust_requirement()
    home = cache_root() / f"faust-env-py{sys.version_info.major}{sys.version_info.minor}"
    python = home / "bin" / "python"
    marker = home / ".requirement"
    with _locked(home):
        if not (marker.exists() and marker.read_text() == requirement and python.exists()):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True, timeout=300)
            # Installed before the layering below, so that pip neither sees nor touches this environment.
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", requirement], check=True, timeout=600
            )
            own = subprocess.run(
                [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            Path(own, "_guardstream_beneath.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            marker.write_text(requirement)
    return python


@pytest.mark.timeout(1200)
def test_the_faust_records_tests_pass_where_faust_is_installed(kafka_bootstrap: str) -> None:
    if importlib.util.find_spec("faust") is not None:
        pytest.skip("faust is installed here: tests/test_faust_records.py runs in this session itself")
    python = faust_environment()
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faust_records.py"],
        cwd=REPO_ROOT,
        env=os.environ | {"GUARDSTREAM_TEST_KAFKA": kafka_bootstrap},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
