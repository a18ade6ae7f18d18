"""``listen.workers = N``: N worker processes on one port, under one parent that starts and watches them.

Theory of operation
-------------------
The parent loads the configuration (a bad one exits 2 before anything starts), then:

* **reserves the port.** It binds, without listening, one socket per address of ``listen.host`` with
  SO_REUSEPORT, on ``listen.port`` (port 0: the kernel picks one, once). Each worker then binds a
  listening socket of its own to that same port with SO_REUSEPORT and the kernel spreads new
  connections over the workers' sockets. The parent's socket never listens, so it takes no connection;
  it keeps the port while a worker restarts, and makes ``sidecar.listening`` name one real URL.
* **gives the workers one token.** With ``store.kind = "memory"`` the parent makes a file store of its
  own: a fresh private directory (mode 0700) and a random key, so N workers make the token requests of
  one. The workers are forked, so the key reaches them in the memory they inherit: it is in no
  environment variable, command line, file or pipe, and the redaction filter masks it. The directory
  is removed when the parent exits (after a SIGKILL of the parent it stays, holding an entry that
  nobody can open: the key died with the processes). A configured file or redis store is used as is.
* **forks the workers.** Each one is a whole sidecar (its own event loop, upstream pool and token
  manager), run by ``cli.serve``. The parent has no event loop and no thread, which is what makes
  ``fork()`` safe: a worker starts from a clean interpreter state. It tells the parent it listens by
  writing its index to a pipe; when all have, the parent logs ``sidecar.listening``.
* **watches them.** Signals are blocked in the parent and taken with ``sigtimedwait``. SIGTERM and SIGINT
  are forwarded (each worker drains for ``listen.shutdown_grace_s``; one still running
  ``STOP_MARGIN_S`` after that is killed); SIGHUP is forwarded (each worker reads its secret files
  again). A worker that exits while nobody asked it to is restarted after a backoff
  (``RESTART_DELAY_S``, doubling, at most ``RESTART_DELAY_CAP_S``); more than ``MAX_RESTARTS`` deaths of
  one worker within ``RESTART_WINDOW_S`` and the parent gives up: it stops the others and exits 1. A
  worker that exits 2 (its configuration is bad) stops everything with exit 2.

The worker inherits the blocked signal mask; ``cli.serve`` unblocks it once its loop's handlers are in
place, so a SIGTERM sent while a worker is still starting waits for the handler instead of killing it.

Exit codes follow the contract: 0 when every worker stopped cleanly, 2 a configuration error, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import Config, StoreConfig
from .observability import Redactor, event

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
# A worker that died unexpectedly is restarted after this long, doubling with each death in the window.
RESTART_DELAY_S = 0.5
RESTART_DELAY_CAP_S = 10.0
# More deaths than this of one worker within the window: a crash loop, not bad luck. Five restarts with
# the delays above take about 15 s, long enough for a port or a provider to come back.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# After listen.shutdown_grace_s, a worker still has its cleanup to do (cli.CANCEL_WAIT_S and
# CLEANUP_TIMEOUT_S, a second each, then the store and the pool): this long more before it is killed.
STOP_MARGIN_S = 5.0
# How often the parent looks at the ready pipe while a worker is starting (otherwise it sleeps until a signal).
POLL_S = 0.05
IDLE_WAIT_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STORE_KEY_BYTES = 32  # 43 characters of base64url: above store.key's minimum of 32


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker a process is: shown in its /-/status and its ``worker.listening`` line."""

    index: int
    count: int
    ready_fd: int = -1  # the pipe the worker writes its index to when it listens

    def listening(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, bytes([self.index]))


# What the parent runs in a forked worker: cli's serve, with this worker's config; returns the exit code.
WorkerMain = Callable[[Config, WorkerInfo], int]


@dataclass
class _Slot:
    index: int
    pid: int = 0
    listening: bool = False
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    code: int | None = None  # how it ended, once the parent stopped it


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bound, non-listening SO_REUSEPORT sockets on each address of ``host``, all on one port; the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server does
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # port 0: the first bind picks it, the others take the same
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets, port


def private_store(config: Config) -> tuple[Config, Path | None]:
    """The config the workers run: with a memory store, a file store in a new 0700 directory under a new
    random key (and that directory, for the parent to remove); any other store as configured."""
    if config.store.kind != "memory":
        return config, None
    directory = Path(tempfile.mkdtemp(prefix="oauth-sidecar-workers-"))  # mode 0700, ours alone
    store = StoreConfig(
        kind="file",
        path=str(directory / "token"),
        key=secrets.token_urlsafe(STORE_KEY_BYTES),
        lease_s=config.store.lease_s,
        prefix=config.store.prefix,
    )
    return replace(config, store=store), directory


def run_workers(config: Config, redactor: Redactor, worker_main: WorkerMain) -> int:
    """Reserve the port, start ``listen.workers`` workers, watch them until SIGTERM/SIGINT; the exit code."""
    try:
        reserved, port = reserve_port(config.listen.host, config.listen.port)
    except OSError as exc:
        print(
            f"oauth-sidecar: cannot listen on {config.listen.host}:{config.listen.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    config = replace(config, listen=replace(config.listen, port=port))
    directory: Path | None = None
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        try:
            config, directory = private_store(config)
        except OSError as exc:
            print(
                f"oauth-sidecar: cannot make the workers' private token store in {tempfile.gettempdir()}: "
                f"{exc.strerror or exc} (set TMPDIR to a writable directory, or configure [store])",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        redactor.add([config.store.key])
        shared: dict[str, Any] = {"store": config.store.kind}
        if directory is not None:  # the directory is no secret; the key is, and is never logged
            shared = {"store": "private file store", "store_dir": str(directory)}
        event("workers.starting", workers=config.listen.workers, pid=os.getpid(), **shared)
        return _Parent(config, worker_main, reserved).run()
    finally:
        for sock in reserved:
            sock.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class _Parent:
    def __init__(self, config: Config, worker_main: WorkerMain, reserved: list[socket.socket]) -> None:
        self.config, self.worker_main, self.reserved = config, worker_main, reserved
        self.count = config.listen.workers
        self.slots = [_Slot(i) for i in range(self.count)]
        self.parent_pid = os.getpid()
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        self.announced = False
        self.stopping = False
        self.stop_deadline = 0.0
        self.failure: int | None = None  # the exit code a failure decided (1 gave up, 2 config error)

    def run(self) -> int:
        try:
            for slot in self.slots:
                self.start_worker(slot)
            while not (self.stopping and all(slot.pid == 0 for slot in self.slots)):
                self._step()
            return self.exit_code()
        finally:
            self._kill_all()
            os.close(self.ready_r)
            os.close(self.ready_w)

    def _step(self) -> None:
        now = time.monotonic()
        waits = [IDLE_WAIT_S]
        if any(slot.pid and not slot.listening for slot in self.slots):
            waits.append(POLL_S)
        waits += [max(0.0, slot.restart_at - now) for slot in self.slots if slot.restart_at is not None]
        if self.stopping:
            waits.append(max(0.0, self.stop_deadline - now))
        info = signal.sigtimedwait(SIGNALS, min(waits))
        if info is not None:
            self._signal(info.si_signo)
        self._reap()
        self._read_ready()
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self.stopping:
                slot.restart_at = None
                self.start_worker(slot)
        if self.stopping and now >= self.stop_deadline:
            for slot in self.slots:
                if slot.pid:
                    event("worker.killed", level=logging.WARNING, index=slot.index, pid=slot.pid)
                    send_signal(slot.pid, signal.SIGKILL)
            self.failure = self.failure or EXIT_FAILURE
            self.stop_deadline = now + STOP_MARGIN_S  # reaped within a moment; never wait forever

    def _signal(self, signo: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                event(
                    "workers.stopping", signal=signal.Signals(signo).name, grace_s=self.config.listen.shutdown_grace_s
                )
            self.stop(signo)
        elif signo == signal.SIGHUP:
            self._forward(signal.SIGHUP)

    def stop(self, signo: int = signal.SIGTERM) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.config.listen.shutdown_grace_s + STOP_MARGIN_S
            for slot in self.slots:
                if slot.pid == 0:  # dead and waiting for its restart: nothing left to stop
                    slot.code, slot.restart_at = EXIT_OK, None
        self._forward(signo)

    def _forward(self, signo: int) -> None:
        for slot in self.slots:
            if slot.pid:
                send_signal(slot.pid, signo)

    def start_worker(self, slot: _Slot) -> None:
        slot.listening = False
        info = WorkerInfo(slot.index, self.count, self.ready_w)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: a death like any other, restarted after the backoff
            self.exited(slot, EXIT_FAILURE, fork_failed=exc.strerror or str(exc))
            return
        if pid == 0:  # the worker: never returns into the parent's code
            code = EXIT_FAILURE
            try:
                _end_with_parent(self.parent_pid)
                os.close(self.ready_r)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # the rest: cli.serve, when it can
                for sock in self.reserved:
                    sock.close()
                code = self.worker_main(self.config, info)
            except BaseException:  # a worker must end here, whatever happened
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        slot.pid = pid

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid, slot.listening = 0, False
            self.exited(slot, os.waitstatus_to_exitcode(status))

    def exited(self, slot: _Slot, code: int, **why: str) -> None:
        """``code`` as os.waitstatus_to_exitcode gives it: the exit status, or minus the signal number."""
        how: dict[str, Any] = {"code": code} if code >= 0 else {"signal": _signal_name(-code)}
        how.update(why)
        if self.stopping:
            slot.code = code
            level = logging.INFO if code == EXIT_OK else logging.WARNING
            event("worker.exited", level=level, index=slot.index, expected=True, **how)
            return
        now = time.monotonic()
        slot.deaths.append(now)
        while slot.deaths and slot.deaths[0] < now - RESTART_WINDOW_S:
            slot.deaths.popleft()
        if code == EXIT_CONFIG:
            event("worker.exited", level=logging.ERROR, index=slot.index, expected=False, restart="no", **how)
            self.failure = EXIT_CONFIG
            self.stop()
            return
        if len(slot.deaths) > MAX_RESTARTS:
            event("worker.exited", level=logging.ERROR, index=slot.index, expected=False, restart="no", **how)
            event(
                "workers.gave_up",
                level=logging.ERROR,
                index=slot.index,
                deaths=len(slot.deaths),
                window_s=RESTART_WINDOW_S,
                detail="a worker keeps dying: stopping the others",
            )
            self.failure = EXIT_FAILURE
            self.stop()
            return
        delay = min(RESTART_DELAY_CAP_S, RESTART_DELAY_S * 2 ** (len(slot.deaths) - 1))
        event("worker.exited", level=logging.WARNING, index=slot.index, expected=False, restart_in_s=delay, **how)
        slot.restart_at = now + delay

    def _read_ready(self) -> None:
        while True:
            try:
                data = os.read(self.ready_r, 64)
            except BlockingIOError:
                break
            except OSError as exc:  # pragma: no cover - the pipe is ours; nothing else closes it
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                break
            for index in data:
                if 0 <= index < self.count and self.slots[index].pid:
                    self.slots[index].listening = True
        if not self.announced and all(slot.listening for slot in self.slots):
            self.announced = True
            event("sidecar.listening", url=listen_url(self.config), workers=self.count)

    def exit_code(self) -> int:
        if self.failure is not None:
            return self.failure
        if any(slot.code != EXIT_OK for slot in self.slots):
            return EXIT_FAILURE
        event("sidecar.stopped", workers=self.count)
        return EXIT_OK

    def _kill_all(self) -> None:
        """On the way out, however it came: no worker outlives the parent."""
        for slot in self.slots:
            if slot.pid:
                send_signal(slot.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(slot.pid, 0)
                slot.pid = 0


def send_signal(pid: int, signo: int) -> None:
    """Signal one worker. Only a real child's pid: kill(0, ...) would reach the whole process group and
    kill(-1, ...) every process this user may signal, so anything below 2 is refused outright."""
    if pid < 2:
        raise ValueError(f"not a worker's pid: {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signo)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, say
        return str(number)


def _end_with_parent(parent_pid: int) -> None:
    """In a worker: SIGTERM when the parent dies (killed with SIGKILL, say), so no worker is left behind
    serving on its own; it drains and exits as on any SIGTERM. Linux's prctl(PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above: nobody would send it
        os.kill(os.getpid(), signal.SIGTERM)  # blocked until serve() handles it


def listen_url(config: Config) -> str:
    """The URL clients use: listen.host (a wildcard shown as 127.0.0.1) and the port."""
    host = config.listen.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{config.listen.port}"
