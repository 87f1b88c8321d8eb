"""Code trees side by side: a revision's `processor/` unpacked beside the working tree, each tree served
by a process of its own that answers one JSON line per command, and the trees stepped in turn.

Used by bench/step.py and bench/engine_host.py. Alternating step by step, the order flipping every
step, lets a change be judged by per-step ratios, which the machine's minute-to-minute speed moves far
less than it moves either side's time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unpack_revision(revision: str, into: Path) -> Path:
    """`processor/` as it was at `revision` (git archive), under `into`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "processor"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class TreeServer:
    """One code tree's server process: `command` must import `processor` from `root`, answer
    {"processor": path} when ready, then one JSON line per "step" line it reads."""

    def __init__(self, command: list[str], root: Path) -> None:
        self.root = root
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server for {self.root} exited (rc {self.process.wait()})")
        return json.loads(line)

    def wait_ready(self) -> None:
        ready = self.read()
        # An installed checkout could shadow the tree asked for: refuse to compare a tree with itself.
        if Path(ready["processor"]).resolve() != (self.root / "processor").resolve():
            raise RuntimeError(f"the server for {self.root} imported processor from {ready['processor']}")

    def step(self) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def step_in_turn(servers: dict[str, TreeServer], steps: int) -> dict[str, list[dict]]:
    """Every server made ready, then `steps` answers from each, in turn, the order flipping every step;
    all closed at the end."""
    try:
        for server in servers.values():
            server.wait_ready()
        answers: dict[str, list[dict]] = {name: [] for name in servers}
        names = list(servers)
        for step in range(steps):
            for name in names if step % 2 == 0 else reversed(names):
                answers[name].append(servers[name].step())
        return answers
    finally:
        for server in servers.values():
            server.close()
