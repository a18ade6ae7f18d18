"""The installed console script, run as a user would: `oauth-sidecar --dev`, `--version`; and how cli runs the loop."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from proxy import __version__, cli
from tests.fakes.sidecar import clean_env

STARTUP_TIMEOUT_S = 30.0
CURL_LINE = re.compile(r"curl (http://127\.0\.0\.1:\d+/v1/hello)\s*$")


def console_script() -> str:
    """The `oauth-sidecar` script installed next to this interpreter (the venv's bin directory)."""
    found = shutil.which("oauth-sidecar", path=str(Path(sys.executable).parent))
    assert found, f"oauth-sidecar is not installed next to {sys.executable}; run pip install -e '.[test]'"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_until_curl_line(stdout: asyncio.StreamReader) -> tuple[str, list[str]]:
    """The URL of the printed `curl .../v1/hello` line, and everything printed up to it."""
    lines: list[str] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for _ in range(100):  # the banner is a handful of lines
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no curl line within {STARTUP_TIMEOUT_S}s: {lines}"
        raw = await asyncio.wait_for(stdout.readline(), remaining)
        assert raw, f"the process closed stdout before printing a curl line: {lines}"
        line = raw.decode().rstrip()
        lines.append(line)
        if match := CURL_LINE.search(line):
            return match.group(1), lines
    raise AssertionError(f"no curl line in {lines}")


async def test_dev_mode_serves_the_demo_api_and_stops_cleanly_on_sigterm(tmp_path):
    """`oauth-sidecar --dev --port N` prints a working curl line; SIGTERM makes it exit 0."""
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            console_script(),
            "--dev",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=clean_env(),
            cwd=tmp_path,
        )
        try:
            url, printed = await read_until_curl_line(proc.stdout)
            assert url == f"http://127.0.0.1:{port}/v1/hello"
            assert any(f"proxy listening on http://127.0.0.1:{port}" in line for line in printed)
            async with aiohttp.ClientSession() as session:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "application/json"
                    body = await resp.json()
                async with session.get(url.replace("/v1/hello", "/-/ready")) as ready:
                    assert ready.status == 200
            assert body == {"message": "hello from the demo API", "subject": "demo"}
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    logs = stderr_path.read_text()
    assert code == 0, logs
    assert "Traceback" not in logs
    assert "sidecar.stopped" in logs
    assert "eyJ" not in logs  # no JWT (the demo's tokens) was logged


async def test_version():
    """`oauth-sidecar --version` prints the version and exits 0."""
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "--version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"oauth-sidecar {__version__}"


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it carries as ``__context__`` or ``__cause__``."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


@pytest.mark.parametrize("uvloop_installed", [True, False], ids=["uvloop", "no-uvloop"])
def test_an_exception_escaping_the_run_carries_no_uvloop_import_error(monkeypatch, uvloop_installed):
    """cli.run decides on uvloop before the run: what the run raises is not chained to an ImportError."""
    if uvloop_installed:
        pytest.importorskip("uvloop")
    else:
        monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError

    async def fails() -> int:
        raise RuntimeError("raised inside the run")

    with pytest.raises(RuntimeError, match="raised inside the run") as raised:
        cli.run(fails())
    chained = _chain(raised.value)
    assert not [exc for exc in chained if isinstance(exc, ImportError)], chained
