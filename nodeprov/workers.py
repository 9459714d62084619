"""``nodeprov start --workers N``: one supervisor process, N worker processes, one HTTP port.

The supervisor binds and listens on the HTTP port first (with SO_REUSEPORT), so a port in
use is one error line before any worker starts, and hands that socket to every worker as an
inherited file descriptor (``pass_fds``). Each worker serves it and a listening socket of its
own on the same address (SO_REUSEPORT), and the kernel spreads new connections over these
sockets by a hash of their addresses. With only the shared socket, every idle worker wakes for
a new connection and the first to run takes all that are queued: the clients of a burst (a
load balancer's keep-alive pool) all landed on the worker that had just been busy, and a
second worker added nothing. The shared socket keeps the port answering while no worker runs
(its connections wait for the next one); connections queued to the own socket of a worker
that is killed are reset (the clients retry).

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
READY_FD_OPTION = "--ready-fd"  # a pipe a worker writes its pid to once it serves
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# A worker that ran this long before exiting was healthy: its restart waits the first backoff.
HEALTHY_SECONDS = 30.0
# Workers get this long after SIGTERM (the daemon's own grace plus closing), then SIGKILL.
STOP_SECONDS = 30.0
PR_SET_PDEATHSIG = 1
# When no worker has ever come up and workers failed to start this many times per slot, the
# supervisor gives up (exit 1) as one process would: a database that cannot be reached or
# a port's socket it cannot use is not fixed by restarting.
BOOT_TRIES = 3


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
    ready: set[int] = field(default_factory=set)  # pids of workers that came up
    boot_failures: int = 0  # workers that exited before they came up
    gave_up: bool = False
    _ready_pipe: tuple[int, int] | None = None
    _pending: bytes = b""

    def _argv(self, ready_fd: int) -> list[str]:
        fd = str(self.sock.fileno())
        parent = str(os.getpid())
        options = [LISTEN_FD_OPTION, fd, PARENT_OPTION, parent, READY_FD_OPTION, str(ready_fd)]
        return [*self.command, *options]

    def _spawn(self, slot: _Slot) -> None:
        assert self._ready_pipe is not None
        ready_fd = self._ready_pipe[1]
        env = dict(os.environ, NODEPROV_WORKER_INDEX=str(slot.index))
        slot.proc = subprocess.Popen(
            self._argv(ready_fd), pass_fds=(self.sock.fileno(), ready_fd), env=env
        )
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _read_ready(self) -> None:
        """Note the workers that said they serve (a pid per line on the ready pipe)."""
        assert self._ready_pipe is not None
        with contextlib.suppress(BlockingIOError):
            self._pending += os.read(self._ready_pipe[0], 4096)
        *lines, self._pending = self._pending.split(b"\n")
        self.ready.update(int(line) for line in lines if line.strip().isdigit())

    def stop(self) -> None:
        """Ask :meth:`run` to stop every worker and return (safe from a signal handler)."""
        self.stopping.set()

    def run(self, poll_seconds: float = 0.2) -> int:
        """Start the workers, restart any that exits, until :meth:`stop`; then stop them all.

        Returns 0; 1 when workers never came up (see :data:`BOOT_TRIES`) or one had to be
        killed after :data:`STOP_SECONDS`.
        """
        self._ready_pipe = os.pipe()
        os.set_blocking(self._ready_pipe[0], False)
        try:
            self.slots = [_Slot(i) for i in range(self.count)]
            for slot in self.slots:
                self._spawn(slot)
            while not self.stopping.wait(poll_seconds):
                self._read_ready()  # before exits: a worker that came up, then died, is no
                now = time.monotonic()  # boot failure
                for slot in self.slots:
                    self._check(slot, now)
            code = self._stop_all()
        finally:
            for fd in self._ready_pipe:
                os.close(fd)
        return 1 if self.gave_up else code

    def _check(self, slot: _Slot, now: float) -> None:
        proc = slot.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            ran = now - slot.started
            slot.backoff = BACKOFF_FIRST if ran >= HEALTHY_SECONDS else slot.backoff
            how = f"signal {-code}" if code < 0 else f"code {code}"
            if proc.pid not in self.ready:
                self.boot_failures += 1
                if not self.ready and self.boot_failures >= BOOT_TRIES * self.count:
                    log.error("workers cannot start (see the errors above); stopping")
                    self.gave_up = True
                    self.stopping.set()
                    slot.proc = None
                    return
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


def say_ready(fd: int) -> None:
    """Tell the supervisor (through its pipe ``fd``) that this worker serves."""
    with contextlib.suppress(OSError):
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)


def worker_sockets(fd: int) -> list[socket.socket]:
    """The socket the supervisor shares (``fd``) and one of this worker's own on its address."""
    shared = socket.socket(fileno=fd)
    shared.setblocking(False)
    own = socket.socket(shared.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # http.server
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(shared.getsockname())
        own.listen(1024)
    except BaseException:
        own.close()
        shared.close()
        raise
    own.setblocking(False)
    return [own, shared]
