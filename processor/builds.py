"""Native code built on first use (the CPU attention kernel): where builds are cached, and running the
tools that make them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def c_compiler(error: type[Exception]) -> str:
    """The C compiler to build with (`$CC`, else `cc`); `error` saying so when there is none."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise error(f"no C compiler ({compiler!r} not found; install gcc or set CC)")
    return compiler


def cache_dir(kind: str, override_variable: str) -> Path:
    """`$override_variable` if set, else `<XDG cache or ~/.cache>/guardstream/<kind>`."""
    configured = os.environ.get(override_variable)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "guardstream" / kind


def run_tool(command: list[str], error: type[Exception], timeout: float, cwd: Path | None = None) -> None:
    """Run a build command; on failure raise `error` saying what failed, with the end of its output."""
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as failed:
        output = (failed.stdout + failed.stderr).strip()[-3000:]
        raise error(f"{' '.join(command)} failed: {output}") from None
    except (OSError, subprocess.TimeoutExpired) as failed:
        raise error(f"{' '.join(command)} failed: {failed}") from None
