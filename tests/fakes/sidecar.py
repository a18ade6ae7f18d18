"""The program as a user runs it: ``python -m proxy --config PATH`` as a child process (:class:`Sidecar`),
the TOML configuration it reads (:func:`write_config`), and an environment without OAUTH_SIDECAR_* variables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

PASSWORD = "pw-ops-test-Vb63-never-print"
STARTUP_TIMEOUT_S = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any OAUTH_SIDECAR_* variable that could change the config, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OAUTH_SIDECAR_")}
    env.update(extra)
    return env


def write_config(
    tmp_path: Path,
    token_url: str,
    upstream: str,
    *,
    password_file: str | None = None,
    api_key_file: str = "",
    grace: float = 10,
    workers: int = 1,
    **auth: Any,
) -> Path:
    """tmp_path/config.toml for the keycloak provider (client demo-client, user demo; further ``auth`` keys
    as given), ``workers`` processes, JSON logs at debug level. The password is read from ``password_file``;
    without one, PASSWORD is written to tmp_path/password."""
    if password_file is None:
        (tmp_path / "password").write_text(PASSWORD + "\n")
        password_file = str(tmp_path / "password")
    lines = [
        "[listen]",
        "port = 0",
        f"shutdown_grace_s = {grace}",
        *([f"workers = {workers}"] if workers != 1 else []),
        "[upstream]",
        f'url = "{upstream}"',
        "[auth]",
        'provider = "keycloak"',
        f'token_url = "{token_url}"',
        'client_id = "demo-client"',
        'username = "demo"',
        f'password_file = "{password_file}"',
        *(f"{key} = {json.dumps(value)}" for key, value in auth.items()),
        *(["[access]", f'api_key_file = "{api_key_file}"'] if api_key_file else []),
        "[log]",
        'format = "json"',
        'level = "debug"',
    ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def spawn(config: Path, *args: str, stdout: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """``python -m proxy [args] --config config`` in the config's directory, with a clean environment; its
    stderr (the log) piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        "--config",
        str(config),
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=config.parent,
    )


class Sidecar:
    """``python -m proxy --config PATH`` as a child process, its JSON log lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config: Path) -> Sidecar:
        return cls(await spawn(config))

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    async def wait_event(self, name: str, seconds: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not (found := self.events(name)):
            remaining = deadline - loop.time()
            if remaining <= 0 or self._reader.done():
                raise AssertionError(f"no {name} event; stderr:\n" + "\n".join(self.lines[-30:]))
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass
        return found[0]

    async def url(self) -> str:
        return str((await self.wait_event("sidecar.listening"))["url"])

    async def exit_code(self, seconds: float = 15.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), seconds)
        await self.output_ended()
        return code

    async def output_ended(self, seconds: float = 5.0) -> None:
        """Until every process writing to the sidecar's stderr closed it (its last lines are in ``lines``)."""
        await asyncio.wait_for(self._reader, seconds)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    """Until the sidecar at ``url`` says /-/ready 200 (bounded: 5 s)."""
    for _ in range(250):
        async with session.get(url + "/-/ready") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the sidecar did not become ready")
