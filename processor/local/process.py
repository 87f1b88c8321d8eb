"""Start, identify and stop the background processes behind `guardstream local`.

A recorded pid alone is not proof of ownership: pids are reused. Each process is therefore recorded
with its kernel start time and a word its command line must contain, and `stop` signals a pid only
while they still match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ServiceError(RuntimeError):
    """A local service could not be prepared or started; the message says what to do."""


class EndedDuringStartup(ServiceError):
    """The process we launched ended before it answered (crash, port race, or a signal from outside)."""


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    pid: int
    start_time: int | None  # /proc/<pid>/stat field 22; None where /proc is missing
    marker: str  # a word that must appear in the command line

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManagedProcess:
        start = data.get("start_time")
        return cls(
            str(data["name"]),
            int(data["pid"]),
            int(start) if start is not None else None,
            str(data["marker"]),
        )


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# Exit statuses of our own children, kept for error messages ("killed by SIGKILL" says a lot).
_exit_status: dict[int, int] = {}


def _reap(pid: int) -> None:
    # A process we spawned ourselves stays a zombie (and so "exists") until its parent waits for it.
    with contextlib.suppress(ChildProcessError, OSError):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            _exit_status[pid] = status


def describe_exit(proc: ManagedProcess) -> str:
    """'exit code N' / 'killed by SIGX' for a child of ours that ended, else a neutral phrase."""
    # A multi-threaded process shows as a zombie a moment before the last thread is gone and
    # waitpid can collect it: give it that moment.
    deadline = time.monotonic() + 2.0
    while proc.pid not in _exit_status and time.monotonic() < deadline and Path(f"/proc/{proc.pid}").exists():
        _reap(proc.pid)
        time.sleep(0.05)
    status = _exit_status.get(proc.pid)
    if status is None:
        return "ended (not our child: no exit status)"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def spawn(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    marker: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start `cmd` in its own session (so it survives our exit and can be signalled as a group)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    stat = _proc_stat(popen.pid)
    # Keep the Popen from warning "still running" when garbage collected: we track the pid ourselves.
    popen.returncode = 0
    return ManagedProcess(name, popen.pid, stat[1] if stat else None, marker)


def is_running(proc: ManagedProcess) -> bool:
    """True only while the pid is alive, not a zombie, and still the very process we started."""
    _reap(proc.pid)
    if not Path("/proc").is_dir():  # non-Linux fallback: existence only
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(proc.pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    if proc.start_time is not None and stat[1] != proc.start_time:
        return False
    cmdline = _cmdline(proc.pid)
    if not cmdline:
        # The kernel reads cmdline out of the process's memory and returns "" while that memory map
        # is busy (seen with a JVM starting up): that means "unknown", not "another process". The
        # matching start time already identifies it.
        return proc.start_time is not None
    return proc.marker in cmdline


def _signal(proc: ManagedProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        try:
            # We started it as a session leader: signal its whole group so helpers die with it.
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
                return
        except ProcessLookupError:
            return
        os.kill(proc.pid, sig)


def stop(proc: ManagedProcess, timeout: float = 20.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`. Returns True if it was ours and running."""
    return stop_all([proc], timeout)[0]


def stop_all(procs: Sequence[ManagedProcess], timeout: float = 20.0) -> list[bool]:
    """`stop` for several processes at once, each True if it was ours and running. The nodes of one
    cluster go down together: stopped one by one, the last would wait on a quorum that has left."""
    ours = [is_running(proc) for proc in procs]
    running = [proc for proc, alive in zip(procs, ours, strict=True) if alive]
    for proc in running:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = [proc for proc in running if not _wait_gone(proc, deadline - time.monotonic())]
    for proc in left:
        if is_running(proc):
            _signal(proc, signal.SIGKILL)
    for proc in left:
        _wait_gone(proc, 5.0)
    return ours


def _wait_gone(proc: ManagedProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(proc):
            return True
        time.sleep(0.1)
    return not is_running(proc)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the kernel picks it); small race, fine for a dev box."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def can_listen(host: str, port: int) -> bool:
    """Whether a server could bind `port` now. Unlike `port_in_use`, this also sees a port held by a
    socket that does not listen (the local end of an outgoing connection)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no bar
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (Linux's default off Linux)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(int(low), int(high) + 1)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
