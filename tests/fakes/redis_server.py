"""A real ``redis-server`` on 127.0.0.1 for the store tests: started on a free port, stopped by pid.

Nothing is persisted (no RDB, no AOF); the data lives in the server process, so ``stop()`` then
``start()`` on the same port is an outage that loses the entry, as a Redis without persistence would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path, *, password: str = "", acl_user: tuple[str, str] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # .ci/run installs it; a developer without it is told how
            pytest.fail("redis-server is not installed (apt-get install -y redis-server; .ci/run does it)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.acl_user = acl_user
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.acl_user is not None:  # an ACL user needs a config file (the command line splits the rule)
            user, password = self.acl_user
            conf = self.workdir / f"redis-{self.port}.conf"
            conf.write_text(f"user {user} on >{password} ~* &* +@all\n")
            args.insert(1, str(conf))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):  # +PONG, or -NOAUTH: it is listening
                        return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL)  # an outage, not a shutdown
        proc.wait(5)

    def keys_and_values(self) -> bytes:
        """Every key and every value the server holds, as raw bytes (to look for token bytes in them)."""
        import redis

        client = redis.Redis(port=self.port, password=self.password or None)
        out = b""
        for key in client.scan_iter():
            out += key + b"\n"
            kind = client.type(key)
            if kind == b"hash":
                for field, value in client.hgetall(key).items():
                    out += field + b"=" + value + b"\n"
            elif kind == b"string":
                out += bytes(client.get(key) or b"") + b"\n"
        client.close()
        return out


class RedisSentinel(RedisServer):
    """A ``redis-server --sentinel`` watching ``master`` under the name ``mymaster`` (quorum 1)."""

    def __init__(self, workdir: Path, master: RedisServer) -> None:
        super().__init__(workdir)
        self.master = master

    def start(self) -> RedisSentinel:
        conf = self.workdir / f"sentinel-{self.port}.conf"  # sentinel rewrites its config file: one of its own
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
        )
        self.proc = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"SENTINEL get-master-addr-by-name mymaster\r\n")
                    if str(self.master.port).encode() in sock.recv(256):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("redis sentinel did not start")
