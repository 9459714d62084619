"""``nodeprov start --workers N``: one supervisor process, N worker processes, one HTTP port.

The supervisor binds the HTTP socket once and hands it to every worker as an inherited
file descriptor (``pass_fds``), rather than each worker binding with SO_REUSEPORT:

- a port in use is one error line from the supervisor, before any worker starts;
- the kernel keeps one accept queue: connections queued behind a worker that dies are
  taken by the others (with SO_REUSEPORT each socket has its own queue, and a dead
  worker's queued connections are reset);
- no other process of the same user can join the port and receive a share of requests.

The supervisor owns the data dir (``core.datadir``); workers are started with a hidden
option naming the inherited descriptor and do not take the data dir lock. A worker that
exits (even on SIGKILL) is restarted after a short backoff; SIGTERM/SIGINT to the
supervisor stops every worker gracefully. Workers end when the supervisor dies (Linux:
``PR_SET_PDEATHSIG``; elsewhere they watch their parent pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Passed to workers on their command line (a hidden `start` option).
LISTEN_FD_OPTION = "--listen-fd"
PARENT_OPTION = "--worker-of"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# A worker that ran this long before exiting was healthy: its restart waits the first backoff.
HEALTHY_SECONDS = 30.0
# Workers get this long after SIGTERM (the daemon's own grace plus closing), then SIGKILL.
STOP_SECONDS = 30.0
PR_SET_PDEATHSIG = 1


@dataclass
class _Slot:
    """One worker position: its current process and how quickly it has been failing."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    """Run ``count`` copies of ``command`` (each also given the socket's fd) until stopped."""

    sock: socket.socket
    count: int
    command: Sequence[str]
    slots: list[_Slot] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def _argv(self) -> list[str]:
        fd = str(self.sock.fileno())
        return [*self.command, LISTEN_FD_OPTION, fd, PARENT_OPTION, str(os.getpid())]

    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ, NODEPROV_WORKER_INDEX=str(slot.index))
        slot.proc = subprocess.Popen(self._argv(), pass_fds=(self.sock.fileno(),), env=env)
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def stop(self) -> None:
        """Ask :meth:`run` to stop every worker and return (safe from a signal handler)."""
        self.stopping.set()

    def run(self, poll_seconds: float = 0.2) -> int:
        """Start the workers, restart any that exits, until :meth:`stop`; then stop them all.

        Returns 0, or 1 when a worker had to be killed after :data:`STOP_SECONDS`.
        """
        self.slots = [_Slot(i) for i in range(self.count)]
        for slot in self.slots:
            self._spawn(slot)
        while not self.stopping.wait(poll_seconds):
            now = time.monotonic()
            for slot in self.slots:
                self._check(slot, now)
        return self._stop_all()

    def _check(self, slot: _Slot, now: float) -> None:
        proc = slot.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            ran = now - slot.started
            slot.backoff = BACKOFF_FIRST if ran >= HEALTHY_SECONDS else slot.backoff
            how = f"signal {-code}" if code < 0 else f"code {code}"
            log.warning(
                "worker %d (pid %d) exited with %s; restarting it in %.1f s",
                slot.index,
                proc.pid,
                how,
                slot.backoff,
            )
            slot.proc = None
            slot.restart_at = now + slot.backoff
            slot.backoff = min(BACKOFF_MAX, slot.backoff * 2)
            return
        if now >= slot.restart_at:
            slot.restarts += 1
            self._spawn(slot)

    def _stop_all(self) -> int:
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        killed = 0
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
                killed += 1
        return 1 if killed else 0


def supervise(sock: socket.socket, count: int, command: Sequence[str]) -> int:
    """Run the workers until SIGTERM/SIGINT; the exit code for the supervisor."""
    supervisor = Supervisor(sock, count, command)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(_signum: int, _frame: object) -> None:
        supervisor.stop()

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_command(root_args: Sequence[str], start_args: Sequence[str]) -> list[str]:
    """The command line of one worker: this Python, ``nodeprov`` with the same options."""
    return [sys.executable, "-m", "nodeprov", *root_args, "start", *start_args]


# --- the worker's side ----------------------------------------------------------------


def die_with_parent(parent: int, on_orphaned: Callable[[], None]) -> None:
    """End this worker when the supervisor ``parent`` dies, however it dies.

    On Linux the kernel sends SIGTERM (a graceful stop) when the parent exits; elsewhere a
    thread watches the parent pid. A parent that died before this call is noticed at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:
                on_orphaned()
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def inherited_socket(fd: int) -> socket.socket:
    """The listening socket the supervisor passed as ``fd`` (non-blocking, as bind makes it)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
