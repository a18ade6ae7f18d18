"""The program as operators run it, in a subprocess: clean shutdown on SIGTERM/SIGINT, and --check."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cli import EXIT_CONFIG, check, main
from proxy.demo import DemoIdP
from tests.fakes.servers import keycloak_config, start_app, start_idp, start_proxy
from tests.fakes.sidecar import PASSWORD, Sidecar, clean_env, spawn, wait_ready, write_config


async def _refuses_connections(port: int, seconds: float = 5.0) -> bool:
    """True once connecting to ``port`` is refused (bounded in time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)
    return False


async def _slow_upstream(aiohttp_server: Any) -> tuple[str, asyncio.Event, asyncio.Event]:
    """An upstream whose /slow answers only when the test releases it (and at least 0.5 s after it arrived)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started = asyncio.get_running_loop().time()
        arrived.set()
        await asyncio.wait_for(release.wait(), 20)
        await asyncio.sleep(max(0.0, 0.5 - (asyncio.get_running_loop().time() - started)))
        return web.Response(text="slow and complete")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/{tail:.*}", fast)
    return await start_app(aiohttp_server, app), arrived, release


async def test_sigterm_lets_a_slow_request_finish_then_ends_the_session(aiohttp_server, tmp_path):
    """SIGTERM during a slow request: new connections are refused at once, the request still gets its 200,
    the session is ended at the provider (revoke_on_shutdown), and the process exits 0."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    upstream, arrived, release = await _slow_upstream(aiohttp_server)
    sidecar = await Sidecar.start(write_config(tmp_path, idp.token_url(), upstream, revoke_on_shutdown=True))
    try:
        url = await sidecar.url()
        port = int(url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            async with session.get(url + "/fast?marker=query-marker-5520") as resp:
                assert resp.status == 200
            slow = asyncio.create_task(session.get(url + "/slow"))
            await asyncio.wait_for(arrived.wait(), 10)

            sidecar.proc.send_signal(signal.SIGTERM)
            await sidecar.wait_event("sidecar.stopping")
            assert await _refuses_connections(port)
            assert sidecar.proc.returncode is None  # still draining the slow request
            assert idp.hits["logout"] == 0  # the session is ended only after the requests are done

            release.set()
            resp = await asyncio.wait_for(slow, 15)
            assert resp.status == 200
            assert await resp.text() == "slow and complete"
        assert await sidecar.exit_code() == 0
    finally:
        release.set()
        await sidecar.kill()
    assert idp.hits["logout"] == 1
    assert [e["how"] for e in sidecar.events("token.session_ended")] == ["logout"]
    assert sidecar.events("sidecar.stopped")
    access = [(e["path"], e["status"]) for e in sidecar.events("request")]
    assert access == [("/fast", 200), ("/slow", 200)]
    assert "query-marker-5520" not in "\n".join(sidecar.lines)
    assert PASSWORD not in "\n".join(sidecar.lines)


async def test_sigint_without_revoke_leaves_the_session(aiohttp_server, tmp_path):
    """SIGINT stops the proxy cleanly (exit 0); with revoke_on_shutdown off the provider is not called."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    upstream, _, release = await _slow_upstream(aiohttp_server)
    sidecar = await Sidecar.start(write_config(tmp_path, idp.token_url(), upstream, revoke_on_shutdown=False))
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
        sidecar.proc.send_signal(signal.SIGINT)
        assert await sidecar.exit_code() == 0
    finally:
        release.set()
        await sidecar.kill()
    assert idp.token_requests == 1
    assert idp.hits["logout"] == 0 and idp.hits["revoke"] == 0
    assert not sidecar.events("token.session_ended")
    assert sidecar.events("sidecar.stopped")


async def test_grace_period_bounds_the_wait(aiohttp_server, tmp_path):
    """A request still running when listen.shutdown_grace_s runs out is cut; the process still exits 0."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    upstream, arrived, release = await _slow_upstream(aiohttp_server)
    sidecar = await Sidecar.start(write_config(tmp_path, idp.token_url(), upstream, grace=0.2))
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            slow = asyncio.create_task(session.get(url + "/slow"))
            await asyncio.wait_for(arrived.wait(), 10)
            loop = asyncio.get_running_loop()
            started = loop.time()
            sidecar.proc.send_signal(signal.SIGTERM)
            assert await sidecar.exit_code() == 0
            assert loop.time() - started < 10  # the upstream would have held it for up to 20 s
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(slow, 5)
    finally:
        release.set()
        await sidecar.kill()
    assert sidecar.events("sidecar.stopping")[0]["grace_s"] == 0.2


@pytest.mark.parametrize("revoke", [False, True])
async def test_rfc7009_revocation_on_shutdown_only_when_asked(aiohttp_server, aiohttp_client, revoke):
    """A provider with only a revocation endpoint gets an RFC 7009 revocation of the refresh token on
    shutdown when revoke_on_shutdown is set, and no call at all when it is not."""
    idp = await start_idp(aiohttp_server)
    revoke_url = idp.issuer() + "/protocol/openid-connect/revoke"
    auth = {"provider": "oauth2", "revoke_url": revoke_url, "revoke_on_shutdown": revoke}
    client = await start_proxy(aiohttp_client, keycloak_config(idp, "http://127.0.0.1:9", auth=auth))
    for _ in range(250):
        if (await client.get("/-/ready")).status == 200:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the proxy did not become ready")
    held = set(idp.refresh)
    assert len(held) == 1
    await client.close()  # the app's cleanup, as on SIGTERM
    assert idp.hits["revoke"] == int(revoke)
    assert idp.hits["logout"] == 0
    assert (set(idp.refresh) == held) is not revoke  # revoked: the provider forgot the refresh token


# --- --check -------------------------------------------------------------------------------------


async def _run_check(config: Path) -> tuple[int, str, str]:
    proc = await spawn(config, "--check")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return await proc.wait(), out.decode(), err.decode()


def _all_tokens(idp: DemoIdP) -> list[str]:
    return [*idp.access, *idp.refresh]


async def test_check_prints_subject_and_expiry_never_the_token(aiohttp_server, tmp_path):
    """--check logs in once and prints one line with the subject and the expiry, exit 0, no token."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    code, out, err = await _run_check(write_config(tmp_path, idp.token_url(), "http://127.0.0.1:9"))
    assert code == 0, err
    assert idp.token_requests == 1
    assert len(out.splitlines()) == 1
    assert re.fullmatch(
        r"ok: logged in to keycloak as demo; token [0-9a-f]{10} expires in 300s "
        r"\(at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\); refresh token: yes\n",
        out,
    )
    tokens = _all_tokens(idp)
    assert len(tokens) == 2
    for secret in (*tokens, PASSWORD):
        assert secret not in out + err
    assert idp.hits["logout"] == 0


async def test_check_ends_the_session_when_asked(aiohttp_server, tmp_path, capsys):
    """With revoke_on_shutdown, --check does not leave a session behind at the provider."""
    idp = await start_idp(aiohttp_server)
    config = keycloak_config(idp, "http://127.0.0.1:9", auth={"revoke_on_shutdown": True})
    assert await check(config) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: logged in to keycloak as demo;")
    assert out.endswith("; session ended (logout)\n")
    assert idp.hits["logout"] == 1
    assert not idp.refresh  # the provider forgot the refresh token


async def test_check_wrong_password_fails_with_the_reason(aiohttp_server, tmp_path):
    """--check with a wrong password exits non-zero and says what the provider answered."""
    idp = await start_idp(aiohttp_server, users={"demo": "another-password"})
    code, out, err = await _run_check(write_config(tmp_path, idp.token_url(), "http://127.0.0.1:9"))
    assert code == 1
    assert out == ""
    assert "check failed" in err
    assert "invalid_grant: Invalid user credentials" in err
    assert PASSWORD not in err


async def test_check_unreachable_idp_fails_with_the_reason(aiohttp_server, tmp_path, unused_tcp_port):
    """--check against an identity provider that is down exits non-zero saying it is unreachable."""
    config = write_config(tmp_path, f"http://127.0.0.1:{unused_tcp_port}/realms/x/token", "http://127.0.0.1:9")
    code, out, err = await _run_check(config)
    assert code == 1
    assert out == ""
    assert "token endpoint unreachable" in err


def test_check_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    """--check with a configuration error exits 2 and names the file and the key, before any login."""
    path = tmp_path / "config.toml"
    path.write_text('[upstream]\nurl = "https://api.example"\n[auth]\nprovider = "keycloak"\ntoken_url = "x"\n')
    assert main(["--check", "--config", str(path)], env={}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(path) in err and "auth.token_url" in err

    path.write_text("[listen]\nprot = 8360\n")
    assert main(["--check", "--config", str(path)], env={}) == EXIT_CONFIG
    assert "listen.prot: unknown key" in capsys.readouterr().err


async def test_check_bad_config_exit_code_from_the_console_script(tmp_path):
    """The installed oauth-sidecar script itself exits 2 on a configuration error."""
    script = Path(sys.executable).with_name("oauth-sidecar")
    assert script.exists()
    path = tmp_path / "config.toml"
    path.write_text("[auth]\ngrant_type = 'implicit'\n")
    proc = await asyncio.create_subprocess_exec(
        str(script), "--check", "--config", str(path), stderr=asyncio.subprocess.PIPE, env=clean_env()
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == EXIT_CONFIG
    assert b"configuration error" in err
