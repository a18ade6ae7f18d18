"""Real upstream servers as subprocesses on 127.0.0.1: nginx and six Python servers running tests/wire/apps.py.

Each server gets a free port, a temporary directory for its request log and its output, and is started
with the test interpreter (``sys.executable -m gunicorn ...``) so the venv's packages are the ones
tested. :func:`launch_all` starts them all at once (startup overlaps); :meth:`RealServer.wait_ready`
sends an HTTP probe until one is answered, bounded in time; :meth:`RealServer.stop` terminates the
process group by its id and kills it after a bounded wait (:func:`stop_all` stops them all at once). A
server that cannot be started (binary or module missing, crash at startup) is reported with a message
saying so and the tail of its output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NGINX_PATHS = ("/usr/sbin/nginx", "/usr/bin/nginx")
READY_TIMEOUT_S = 20.0  # a cold interpreter importing uvicorn on a busy 2-core machine takes ~1-2 s
STOP_TIMEOUT_S = 5.0
PROBE_PREFIX = "wire-probe-"
INSTALL_HINT = "install the test extra (pip install -e '.[test]'); CI does it in .ci/run"

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format wire escape=json '{{"id":"$http_x_request_id","method":"$request_method",'
        '"target":"$request_uri","cl":"$content_length","te":"$http_transfer_encoding",'
        '"request_length":"$request_length","status":"$status","conn":"$connection",'
        '"conn_requests":"$connection_requests","request":"$request"}}';
    access_log {dir}/access.log wire;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            add_header X-Echo-Request-Id $http_x_request_id always;
            add_header X-Echo-Method $request_method always;
            return 200 "$request_method $request_uri\\n";
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _gunicorn(*args: str) -> list[str]:
    # Gunicorn 24+ opens a control socket in ~/.gunicorn by default: one per server, outside our temp dir.
    import gunicorn.config

    quiet = ["--no-control-socket"] if hasattr(gunicorn.config, "ControlSocketDisable") else []
    return _python("gunicorn", *quiet, *args)


# name -> (what must be installed, argv for a port). Access logs off: the output file then holds only
# what a server says about trouble (a request it could not parse, a traceback), which the tests read.
PYTHON_SERVERS: dict[str, tuple[str, Callable[[int], list[str]]]] = {
    "gunicorn-sync": (
        "gunicorn",
        lambda port: _gunicorn(
            *("--worker-class", "sync", "--workers", "1", "--bind", f"127.0.0.1:{port}"),
            *("--graceful-timeout", "1", "--log-level", "info", "tests.wire.apps:wsgi"),
        ),
    ),
    "gunicorn-gthread": (
        "gunicorn",
        lambda port: _gunicorn(
            *("--worker-class", "gthread", "--workers", "1", "--threads", "4", "--keep-alive", "30"),
            *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "1", "--log-level", "info"),
            "tests.wire.apps:wsgi",
        ),
    ),
    "uvicorn-h11": (
        "uvicorn",
        lambda port: _python(
            "uvicorn",
            *("--http", "h11", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--lifespan", "off", "--timeout-keep-alive", "30", "--timeout-graceful-shutdown", "1"),
            "tests.wire.apps:asgi",
        ),
    ),
    "uvicorn-httptools": (
        "uvicorn",
        lambda port: _python(
            "uvicorn",
            *("--http", "httptools", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--lifespan", "off", "--timeout-keep-alive", "30", "--timeout-graceful-shutdown", "1"),
            "tests.wire.apps:asgi",
        ),
    ),
    "hypercorn": (
        "hypercorn",
        lambda port: _python(
            "hypercorn",
            *("--bind", f"127.0.0.1:{port}", "--workers", "0", "--keep-alive", "30"),
            *("--graceful-timeout", "1", "--log-level", "info", "tests.wire.apps:asgi"),
        ),
    ),
    "waitress": (
        "waitress",
        lambda port: _python(
            "waitress",
            *("--listen", f"127.0.0.1:{port}", "--threads", "4", "--channel-timeout", "30"),
            "tests.wire.apps:wsgi",
        ),
    ),
}
SERVER_NAMES = ("nginx", *PYTHON_SERVERS)


@dataclass
class RealServer:
    """One started server: its port, its request log (one JSON object a line) and its output."""

    name: str
    directory: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    problem: str = ""  # why it could not be started, when it could not
    _argv: list[str] = field(default_factory=list)
    _output_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / ("access.log" if self.name == "nginx" else "requests.log")

    @property
    def output_path(self) -> Path:
        return self.directory / "output.log"

    @property
    def error_log_path(self) -> Path:
        """Where the server reports requests it refused: nginx's error log, else its output."""
        return self.directory / "error.log" if self.name == "nginx" else self.output_path

    def records(self) -> list[dict[str, Any]]:
        """Every request the server logged, probes left out, in order."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if not str(record.get("id", "")).startswith(PROBE_PREFIX):
                out.append(record)
        return out

    def errors_text(self) -> str:
        try:
            return self.error_log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def output_tail(self, size: int = 2000) -> str:
        try:
            return self.output_path.read_text(encoding="utf-8", errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        if self.name == "nginx":
            nginx = next((path for path in NGINX_PATHS if os.access(path, os.X_OK)), None) or shutil.which("nginx")
            if nginx is None:
                self.problem = (
                    f"nginx is not installed (looked in {', '.join(NGINX_PATHS)} and $PATH); apt-get install nginx"
                )
                return
            conf = self.directory / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.directory, port=self.port))
            self._argv = [nginx, "-p", str(self.directory), "-c", str(conf), "-e", str(self.directory / "error.log")]
        else:
            module, argv = PYTHON_SERVERS[self.name]
            if importlib.util.find_spec(module) is None:
                self.problem = f"{module} is not importable by {sys.executable}: {INSTALL_HINT}"
                return
            self._argv = argv(self.port)
        env = {**os.environ, "WIRE_LOG": str(self.log_path), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self._output_file = self.output_path.open("ab")
        self.proc = subprocess.Popen(
            self._argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers are stopped with it
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """ "" once the server answers HTTP; else why not (it exited, or no answer in time)."""
        if self.problem:
            return self.problem
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return (
                    f"{self.name} exited with status {self.proc.returncode} at startup ({' '.join(self._argv)}); "
                    f"output:\n{self.output_tail()}"
                )
            attempt += 1
            if _probe(self.port, f"{PROBE_PREFIX}{attempt}"):
                return ""
            time.sleep(0.05)
        return (
            f"{self.name} did not answer HTTP on port {self.port} within {timeout_s:g}s; output:\n{self.output_tail()}"
        )

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM to its process group); :meth:`stop` waits for it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
            # Workers left behind by a leader that died first (same group, ours): never outlive the run.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._output_file is not None:
            self._output_file.close()
            self._output_file = None


def stop_all(servers: Iterable[RealServer]) -> None:
    """Stop every server, their graceful shutdowns (up to a second each) overlapping."""
    servers = list(servers)
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()


def _probe(port: int, probe_id: str) -> bool:
    request = f"GET /__probe HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {probe_id}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(request.encode())
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def launch_all(base: Path, names: tuple[str, ...] = SERVER_NAMES) -> dict[str, RealServer]:
    """Start every server at once, then wait for each; a port taken meanwhile gets one more try."""
    servers = {name: RealServer(name, base / name) for name in names}
    for server in servers.values():
        server.start()
    for name, server in servers.items():
        problem = server.wait_ready()
        if problem and "in use" in problem.lower():
            server.stop()
            server = servers[name] = RealServer(name, base / f"{name}-again")
            server.start()
            problem = server.wait_ready()
        server.problem = problem
    return servers
