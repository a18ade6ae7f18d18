"""listen.workers: N real worker processes on one port under one parent, sharing one token."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import config as config_module
from proxy import workers
from proxy.cli import EXIT_CONFIG, main
from proxy.config import config_from_mapping
from proxy.demo import DemoIdP
from proxy.observability import Redactor
from proxy.workers import EXIT_FAILURE, MAX_RESTARTS, RESTART_DELAY_S, _Parent, run_workers
from tests.fakes.servers import start_api, start_idp
from tests.fakes.sidecar import PASSWORD, Sidecar, write_config

pytestmark = pytest.mark.skipif(not config_module.WORKERS_SUPPORTED, reason="listen.workers > 1 is Linux only")

# A run of base64url characters as long as the parent's store key (secrets.token_urlsafe(32): 43 of them).
# Nothing the sidecar logs is that long and that random (request ids are 32 hex digits, token ids 10).
KEY_SHAPED = re.compile(r"[A-Za-z0-9_-]{40,}")
FAKE_PID = 999_999_999  # above any pid_max: only ever handed to a recording os.kill
ATTEMPTS = 200  # new connections tried until both workers have answered (the kernel spreads them by hash)


def _alive(pid: int) -> bool:
    """The process runs (a zombie left for an init that does not reap is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None


def _proc(pid: int, what: str) -> bytes:
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read()


async def _stop(sidecar: Sidecar) -> None:
    """However a test ended: the parent and every worker it logged are gone (a worker holds stderr open)."""
    for record in sidecar.events("worker.listening"):
        pid = record["pid"]
        if isinstance(pid, int) and pid > 1:  # never kill(0) or kill(-1): the group, or everything
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await sidecar.kill()


async def _two_workers(aiohttp_server: Any, tmp_path: Path, grace: float) -> tuple[DemoIdP, Sidecar]:
    """A sidecar with listen.workers = 2 (and shutdown_grace_s ``grace``) before a demo provider and API."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    _, upstream = await start_api(aiohttp_server, idp)
    return idp, await Sidecar.start(write_config(tmp_path, idp.token_url(), upstream, grace=grace, workers=2))


async def _status_by_pid(session: aiohttp.ClientSession, url: str, want: int) -> dict[int, dict[str, Any]]:
    """/-/status over new connections until ``want`` distinct workers answered ready (bounded)."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(ATTEMPTS):
        async with session.get(url + "/-/status", headers={"Connection": "close"}) as resp:
            body = await resp.json()
        if body["ready"]:
            seen[body["worker"]["pid"]] = body
        if len(seen) >= want:
            return seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(seen)} of {want} workers answered ready: {sorted(seen)}")


def _assert_no_secret(sidecar: Sidecar) -> None:
    assert KEY_SHAPED.search(secrets.token_urlsafe(32))  # the pattern would find the key
    output = "\n".join(sidecar.lines)
    assert PASSWORD not in output
    assert KEY_SHAPED.findall(output) == []


@pytest.mark.slow  # a parent and two real worker processes
async def test_two_workers_answer_share_one_login_and_stop_on_sigterm(aiohttp_server, tmp_path):
    """Both workers answer on the one URL, the provider sees one login for the two, nothing key-shaped
    is printed, and SIGTERM stops them all within the grace: exit 0, the private store removed."""
    idp, sidecar = await _two_workers(aiohttp_server, tmp_path, grace=3)
    try:
        url = await sidecar.url()
        assert not url.endswith(":0")
        async with aiohttp.ClientSession() as session:
            answered = await _status_by_pid(session, url, 2)
            assert sorted(body["worker"]["index"] for body in answered.values()) == [0, 1]
            assert all(body["worker"]["of"] == 2 for body in answered.values())
            for _ in range(4):
                async with session.get(url + "/api/whoami", headers={"Connection": "close"}) as resp:
                    assert resp.status == 200
        assert idp.token_requests == 1  # one login for the two workers
        (starting,) = sidecar.events("workers.starting")
        store_dir = starting["store_dir"]
        assert _mode(store_dir) == 0o700
        assert len(sidecar.events("worker.listening")) == 2 and len(sidecar.events("sidecar.listening")) == 1
        for pid in answered:  # the key reaches the workers in memory: nothing added to environment or arguments
            for what in ("environ", "cmdline"):
                assert _proc(pid, what) == _proc(sidecar.proc.pid, what)

        sidecar.proc.send_signal(signal.SIGTERM)
        assert await sidecar.exit_code(seconds=3 + workers.STOP_MARGIN_S) == 0
        assert len(sidecar.events("worker.exited")) == 2
        assert all(e["expected"] and e["code"] == 0 for e in sidecar.events("worker.exited"))
        assert not any(_alive(pid) for pid in answered)
        assert _mode(store_dir) is None  # removed
        _assert_no_secret(sidecar)
    finally:
        await _stop(sidecar)


@pytest.mark.slow  # real processes and the restart backoff
async def test_a_worker_killed_with_sigkill_is_restarted_and_serves_again(aiohttp_server, tmp_path):
    """kill -9 of one worker: the parent starts another in its place, which takes the token from the
    store (no second login) and answers; the other worker never stopped."""
    idp, sidecar = await _two_workers(aiohttp_server, tmp_path, grace=2)
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            first = await _status_by_pid(session, url, 2)
            victim = next(pid for pid, body in first.items() if body["worker"]["index"] == 1)
            assert isinstance(victim, int) and victim > 1 and victim != sidecar.proc.pid
            os.kill(victim, signal.SIGKILL)
            exited = await sidecar.wait_event("worker.exited")
            assert exited["signal"] == "SIGKILL" and exited["expected"] is False
            assert exited["restart_in_s"] == RESTART_DELAY_S
            for _ in range(ATTEMPTS):
                if len(sidecar.events("worker.listening")) == 3:
                    break
                await asyncio.sleep(0.02)
            again = await _status_by_pid(session, url, 2)
            assert victim not in again and set(first) - {victim} <= set(again)
            async with session.get(url + "/api/whoami") as resp:
                assert resp.status == 200
        assert idp.token_requests == 1  # the new worker adopted the stored token
        sidecar.proc.send_signal(signal.SIGTERM)
        assert await sidecar.exit_code(seconds=2 + workers.STOP_MARGIN_S) == 0
        _assert_no_secret(sidecar)
    finally:
        await _stop(sidecar)


async def test_workers_end_when_the_parent_is_killed(aiohttp_server, tmp_path):
    """kill -9 of the parent: each worker gets SIGTERM from the kernel and stops, none is left serving."""
    _, sidecar = await _two_workers(aiohttp_server, tmp_path, grace=1)
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            pids = set(await _status_by_pid(session, url, 2))
        sidecar.proc.kill()
        for _ in range(ATTEMPTS):
            if not any(_alive(pid) for pid in pids):
                break
            await asyncio.sleep(0.025)
        assert [pid for pid in pids if _alive(pid)] == []
        await sidecar.output_ended()  # their last lines
        assert len(sidecar.events("sidecar.stopped")) == 2  # each drained and stopped as on SIGTERM
    finally:
        await _stop(sidecar)
        for record in sidecar.events("workers.starting"):  # a parent killed with -9 leaves it (README)
            shutil.rmtree(record["store_dir"], ignore_errors=True)


def _config_file(tmp_path: Path, listen: str, auth: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[listen]\nport = 0\n{listen}\n[upstream]\nurl = "http://127.0.0.1:9"\n'
        f'[auth]\ntoken_url = "http://127.0.0.1:9/token"\nclient_id = "c"\nusername = "u"\npassword = "p"\n{auth}\n'
    )
    return path


@pytest.mark.parametrize(
    ("listen", "auth", "key"),
    [
        ("workers = 0", "", "listen.workers"),
        ("workers = 65", "", "listen.workers"),
        ('workers = "two"', "", 'listen.workers: must be an integer or "auto"'),
        ("workers = 2", "revoke_on_shutdown = true", "auth.revoke_on_shutdown"),
    ],
)
def test_a_bad_workers_config_exits_2_before_any_worker_starts(tmp_path, capsys, listen, auth, key):
    """A bad listen.workers (or one that cannot go with the rest) exits 2 from the parent, naming the key."""
    assert main(["--config", str(_config_file(tmp_path, listen, auth))], env={}) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert key in captured.err
    assert "workers.starting" not in captured.err + captured.out


def test_more_than_one_worker_is_a_config_error_where_the_platform_cannot_spread_connections(
    tmp_path, capsys, monkeypatch
):
    """Without SO_REUSEPORT load balancing (and fork), workers > 1 exits 2 naming listen.workers; 1 is fine."""
    monkeypatch.setattr(config_module, "WORKERS_SUPPORTED", False)
    assert main(["--config", str(_config_file(tmp_path, "workers = 2"))], env={}) == EXIT_CONFIG
    assert "listen.workers: more than 1 needs SO_REUSEPORT" in capsys.readouterr().err
    _config_file(tmp_path, "workers = 1")
    assert main(["--check", "--config", str(tmp_path / "config.toml")], env={}) != EXIT_CONFIG


def test_auto_is_one_worker_per_cpu_this_process_may_use(tmp_path, monkeypatch):
    """workers = "auto" (in the file or the environment) is the CPUs of this process's affinity mask, and 1
    where more than one worker is not supported."""
    cpus = len(os.sched_getaffinity(0))
    path = _config_file(tmp_path, 'workers = "auto"')
    assert config_module.load_config(path, {}).listen.workers == cpus
    env = {"OAUTH_SIDECAR_LISTEN_WORKERS": "auto"}
    assert config_module.load_config(_config_file(tmp_path, ""), env).listen.workers == cpus
    monkeypatch.setattr(config_module, "WORKERS_SUPPORTED", False)
    assert config_module.load_config(path, {}).listen.workers == 1


def test_a_port_in_use_exits_1_before_any_worker_starts(capsys):
    """Another listener (without SO_REUSEPORT) holds the port: the parent says so and exits 1, forking nothing."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _workers_config(port=port)

        def worker_main(*_: Any) -> int:
            raise AssertionError("no worker may start")

        assert run_workers(config, Redactor(), worker_main) == EXIT_FAILURE
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _workers_config(port: int = 0) -> Any:
    return config_from_mapping(
        {
            "listen": {"port": port, "workers": 2},
            "upstream": {"url": "http://127.0.0.1:9"},
            "auth": {"token_url": "http://127.0.0.1:9/token", "client_id": "c", "username": "u", "password": "p"},
        }
    )


def test_restarts_back_off_and_a_crash_loop_gives_up_with_exit_1():
    """A worker dying again and again is restarted after 0.5, 1, 2, ... s; one death more than MAX_RESTARTS
    within the window and the parent stops the rest and exits 1."""
    parent = _Parent(_workers_config(), lambda *_: 0, [])
    try:
        slot = parent.slots[1]
        delays = []
        for _ in range(MAX_RESTARTS):
            parent.exited(slot, -signal.SIGKILL)
            assert slot.restart_at is not None and not parent.stopping
            delays.append(round(slot.restart_at - time.monotonic(), 1))
            slot.restart_at = None
        assert delays == [RESTART_DELAY_S * 2**n for n in range(MAX_RESTARTS)]
        parent.exited(slot, 1)
        assert parent.stopping and parent.failure == EXIT_FAILURE and slot.restart_at is None
        assert parent.exit_code() == EXIT_FAILURE
    finally:
        os.close(parent.ready_r)
        os.close(parent.ready_w)


def test_a_worker_exiting_2_stops_everything_with_exit_2():
    """A worker that exits 2 (its configuration is bad) is not restarted: the parent exits 2."""
    parent = _Parent(_workers_config(), lambda *_: 0, [])
    try:
        parent.exited(parent.slots[0], EXIT_CONFIG)
        assert parent.stopping and parent.slots[0].restart_at is None
        assert parent.exit_code() == EXIT_CONFIG
    finally:
        os.close(parent.ready_r)
        os.close(parent.ready_w)


def test_a_fork_that_fails_is_a_death_restarted_after_the_backoff(monkeypatch, caplog):
    """fork() failing (out of processes or memory) neither crashes the parent nor gives up at once: the
    worker is started again after the backoff, and the log says why."""
    parent = _Parent(_workers_config(), lambda *_: 0, [])

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    try:
        with caplog.at_level("WARNING", logger="oauth_sidecar"):
            parent.start_worker(parent.slots[0])
        assert parent.slots[0].pid == 0 and parent.slots[0].restart_at is not None and not parent.stopping
        (record,) = [r for r in caplog.records if r.getMessage() == "worker.exited"]
        assert record.fields["fork_failed"] == "Resource temporarily unavailable"
    finally:
        os.close(parent.ready_r)
        os.close(parent.ready_w)


def test_a_stop_while_a_worker_waits_for_its_restart_is_clean(monkeypatch):
    """SIGTERM while a worker that died waits out its backoff: it is not started again, and once the others
    stopped cleanly the parent exits 0."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signo: sent.append((pid, signo)))  # no signal leaves this test
    parent = _Parent(_workers_config(), lambda *_: 0, [])
    try:
        parent.exited(parent.slots[0], -signal.SIGKILL)  # died, waits for its restart
        parent.slots[1].pid = FAKE_PID  # the running worker
        parent.stop()
        assert parent.slots[0].restart_at is None and sent == [(FAKE_PID, signal.SIGTERM)]
        parent.slots[1].pid = 0
        parent.exited(parent.slots[1], 0)
        assert parent.exit_code() == 0
    finally:
        os.close(parent.ready_r)
        os.close(parent.ready_w)


def test_the_parent_never_signals_a_pid_below_2(monkeypatch):
    """A slot holding 0 or -1 (a bug) is refused, not passed to kill(), which would signal the process group
    or every process of the user."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signo: sent.append((pid, signo)))
    for pid in (1, 0, -1):
        with pytest.raises(ValueError, match="not a worker's pid"):
            workers.send_signal(pid, signal.SIGTERM)
    assert sent == []


def test_no_writable_temporary_directory_exits_1_saying_so(tmp_path, monkeypatch, capsys):
    """A read-only root filesystem without a tmpfs: the parent cannot make its private store, says where and
    what to do, and exits 1 before any worker starts."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))

    def worker_main(*_: Any) -> int:
        raise AssertionError("no worker may start")

    assert run_workers(_workers_config(), Redactor(), worker_main) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"cannot make the workers' private token store in {tmp_path / 'missing'}" in err
    assert "TMPDIR" in err
