"""Virtual environments beside the project's own, for packages whose pins it cannot take.

Each is built once under cache_root() (a file lock serializes concurrent builds) and rebuilt only when
its requirement changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import site
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from processor.local.kafka import cache_root

REPO_ROOT = Path(__file__).resolve().parents[1]


class PackageIndexUnreachable(Exception):
    """The install failed and pip cannot reach its package index at all."""


def extra_requirement(extra: str) -> str:
    """The one requirement of a pyproject.toml extra, as it is stated there."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = project["optional-dependencies"][extra]
    return requirement


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def side_environment(name: str, requirement: str, beneath: bool = False) -> Path:
    """The python of a cached virtual environment holding `requirement`. With `beneath`, this
    environment's packages are layered under it (a .pth file), so the side environment's pins win."""
    home = cache_root() / f"{name}-env-py{sys.version_info.major}{sys.version_info.minor}"
    python = home / "bin" / "python"
    marker = home / ".requirement"
    with _locked(home):
        if not (marker.exists() and marker.read_text() == requirement and python.exists()):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True, timeout=300)
            # Installed before any layering, so that pip neither sees nor touches this environment.
            _pip_install(python, requirement)
            if beneath:
                own = subprocess.run(
                    [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                Path(own, "_guardstream_beneath.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            marker.write_text(requirement)
    return python


def _pip_install(python: Path, requirement: str) -> None:
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", requirement],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode == 0:
        return
    # pip itself is always on the index: when even it cannot be fetched, the index is out of reach.
    with tempfile.TemporaryDirectory() as scratch:
        probe = subprocess.run(
            [str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--dest", scratch, "pip"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or [""]
        said = next((line for line in lines if "Retrying" in line), lines[-1])
        raise PackageIndexUnreachable(
            f"pip cannot reach its package index to install {requirement}: {said[:300]}"
        )
    raise RuntimeError(f"pip install {requirement} failed:\n{install.stderr[-4000:]}")
