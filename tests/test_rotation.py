"""Secrets that rotate under a running process (proxy/secrets.py, state.on_credentials_changed).

Three layers: the pure decision in state.py; the watcher on real files laid out as the kubelet lays out a
mounted Secret, on virtual time; and ``python -m proxy`` as a user runs it, against the demo identity
provider, with the password fixed by a symlink swap and re-read on SIGHUP.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import state
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.idp import IdentityProvider
from proxy.observability import MASK, Redactor
from proxy.secrets import POLL_INTERVAL_S, Secrets, SecretWatcher
from proxy.state import MIN_LOGIN_INTERVAL_S, Lifecycle, Phase
from tests.fakes.clock import VirtualTime
from tests.fakes.servers import keycloak_config, start_api, start_idp
from tests.fakes.sidecar import Sidecar, wait_ready, write_config

WRONG = "pw-rotation-wrong-Qx81-never-print"
GOOD = "pw-rotation-good-Jm27-never-print"
GOOD2 = "pw-rotation-next-Tz90-never-print"
KEY1 = "key-rotation-first-Hd44-never-print"
KEY2 = "key-rotation-second-Wp15-never-print"
ALL_SECRETS = (WRONG, GOOD, GOOD2, KEY1, KEY2)


class MountedSecret:
    """A directory laid out as the kubelet lays out a mounted Secret: ``<key>`` -> ``..data/<key>``, and
    ``..data`` -> ``..<generation>``. :meth:`update` writes a new generation and swaps ``..data`` in one
    rename, as the kubelet's atomic writer does; the old generation is then removed."""

    def __init__(self, root: Path, **values: str) -> None:
        self.root = root
        root.mkdir()
        self._generations = itertools.count(1)
        self._current: Path | None = None
        self.update(**values)
        for key in values:
            (root / key).symlink_to(Path("..data") / key)

    def path(self, key: str) -> str:
        return str(self.root / key)

    def update(self, **values: str) -> None:
        generation = self.root / f"..2026_12_01_00_00_{next(self._generations):02d}"
        generation.mkdir()
        for key, value in values.items():
            (generation / key).write_text(value + "\n")
        link = self.root / "..data_tmp"
        link.symlink_to(generation.name)
        os.rename(link, self.root / "..data")
        if self._current is not None:
            for file in self._current.iterdir():
                file.unlink()
            self._current.rmdir()
        self._current = generation


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


# --- the decision (state.py) ---------------------------------------------------------------------


def _rejected(now: float, **fields: Any) -> Lifecycle:
    return replace(
        Lifecycle(), phase=Phase.REJECTED, rejections=1, retry_at=now + 60.0, login_ended_at=now - 0.2, **fields
    )


def test_changed_credentials_after_a_refusal_are_tried_now_but_not_within_a_second():
    """Refused credentials that change are due at once, not after the minute of backoff; the login still
    waits out MIN_LOGIN_INTERVAL_S after the refused one."""
    now = 1000.0
    lc = state.on_credentials_changed(_rejected(now), ("auth.password",), now)
    assert lc.phase is Phase.REJECTED and lc.retry_at == now
    assert state.login_wait(lc, now) == pytest.approx(MIN_LOGIN_INTERVAL_S - 0.2)
    assert lc.rejections == 1  # a new password that is wrong too backs off further


@pytest.mark.parametrize("keys", [("access.api_key",), ()])
def test_secrets_the_provider_never_sees_change_nothing(keys):
    """A rotated access.api_key (or nothing) leaves the token lifecycle as it was."""
    lc = _rejected(1000.0)
    assert state.on_credentials_changed(lc, keys, 1000.0) is lc


@pytest.mark.parametrize("phase", [Phase.HOLDING, Phase.BACKING_OFF, Phase.IDLE])
def test_a_change_outside_a_refusal_moves_no_retry(phase):
    """Only a refusal is waited out for new credentials: a held token or a transient backoff keeps its schedule."""
    lc = replace(Lifecycle(), phase=phase, retry_at=1060.0)
    assert state.on_credentials_changed(lc, ("auth.password", "auth.client_secret"), 1000.0) is lc


def test_a_replaced_one_time_code_or_refresh_token_may_be_sent_again():
    """A spent authorization code (or a configured refresh token rotated away) that is replaced is a new
    one: logins are no longer blocked; replacing another secret does not unblock them."""
    code = replace(Lifecycle(grant_type="authorization_code"), code_spent=True)
    assert state.login_blocked(state.on_credentials_changed(code, ("auth.password",), 0.0))
    assert not state.login_blocked(state.on_credentials_changed(code, ("auth.code", "auth.code_verifier"), 0.0))
    spent = replace(Lifecycle(grant_type="refresh_token"), configured_refresh_spent=True)
    assert not state.login_blocked(state.on_credentials_changed(spent, ("auth.refresh_token",), 0.0))


# --- the watcher, on virtual time ------------------------------------------------------------------


async def test_a_symlink_swap_puts_the_new_value_in_force_within_a_poll(tmp_path, caplog):
    """Kubernetes' update of a mounted Secret (a new directory, ..data swapped) is seen at the next poll:
    the new value is in force, the change is reported once, by key and file, and the redactor masks the
    new value and still the old one."""
    mount = MountedSecret(tmp_path / "secret", password=WRONG)
    secrets = Secrets(load_config(env={}, path=_toml(tmp_path, f'password_file = "{mount.path("password")}"')))
    assert secrets.auth.password == WRONG
    redactor = Redactor([WRONG])
    vt = VirtualTime()
    changes: list[tuple[str, ...]] = []
    watcher = SecretWatcher(secrets, redactor=redactor, on_change=changes.append, sleep=vt.sleep)
    task = asyncio.create_task(watcher.run())
    try:
        await vt.run_for(POLL_INTERVAL_S * 2)
        assert changes == []  # the first look reads the files; nothing changed since they were loaded
        mount.update(password=GOOD)
        await vt.run_for(POLL_INTERVAL_S)
        assert secrets.auth.password == GOOD
        assert changes == [("auth.password",)]
        await vt.run_for(POLL_INTERVAL_S * 3)
        assert changes == [("auth.password",)]
    finally:
        task.cancel()
    assert _events(caplog, "secret.rotated") == [{"key": "auth.password", "file": mount.path("password")}]
    assert redactor(f"old {WRONG} new {GOOD}") == f"old {MASK} new {MASK}"
    assert GOOD not in caplog.text and WRONG not in caplog.text


def _toml(tmp_path: Path, auth_line: str, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n'
        '[auth]\nprovider = "keycloak"\ntoken_url = "http://127.0.0.1:9/t"\nclient_id = "c"\nusername = "u"\n'
        f"{auth_line}\n{extra}"
    )
    return path


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda p: p.write_text("\n"), "empty"),
        (lambda p: p.unlink(), "cannot read it (No such file or directory)"),
        (lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
        (lambda p: p.write_bytes(b"\xff\xfe not text"), "not UTF-8 text"),
    ],
    ids=["empty", "removed", "directory", "not-utf8"],
)
async def test_a_file_that_goes_bad_keeps_the_last_good_value_and_says_so_once(tmp_path, caplog, spoil, problem):
    """A secret file that becomes empty, disappears, turns into something else or into garbage keeps the
    last good value in force; the problem is logged once (never the value), and once the file is fixed
    the new value is in force and that is said too."""
    file = tmp_path / "password"
    file.write_text(GOOD)
    secrets = Secrets(load_config(env={}, path=_toml(tmp_path, f'password_file = "{file}"')))
    vt = VirtualTime()
    watcher = SecretWatcher(secrets, sleep=vt.sleep)
    task = asyncio.create_task(watcher.run())
    try:
        await vt.run_for(POLL_INTERVAL_S)
        spoil(file)
        await vt.run_for(POLL_INTERVAL_S * 5)
        assert secrets.auth.password == GOOD
        unreadable = _events(caplog, "secret.unreadable")
        assert [(e["key"], e["problem"]) for e in unreadable] == [("auth.password", problem)]
        assert watcher.problems == {"auth.password": problem}
        if file.is_dir():
            file.rmdir()
        file.write_text(GOOD2 + "\n")
        await vt.run_for(POLL_INTERVAL_S)
        assert secrets.auth.password == GOOD2
    finally:
        task.cancel()
    assert [e["key"] for e in _events(caplog, "secret.readable")] == ["auth.password"]
    assert watcher.problems == {}
    assert not [r for r in caplog.records if GOOD in str(getattr(r, "fields", "")) or GOOD2 in r.getMessage()]


async def test_after_a_refusal_every_file_is_read_even_when_its_stat_looks_the_same(tmp_path, monkeypatch):
    """A change the stat cannot show (a rewrite within one clock tick) is found once the provider refused
    the credentials: every file is then read again, before the next attempt."""
    file = tmp_path / "password"
    file.write_text(WRONG)
    secrets = Secrets(load_config(env={}, path=_toml(tmp_path, f'password_file = "{file}"')))
    monkeypatch.setattr("proxy.secrets.stamp", lambda path: ("same", 1, 1, 1, 1, 1))
    refusals = 0
    watcher = SecretWatcher(secrets, refusals=lambda: refusals)
    assert watcher.poll() == ()
    file.write_text(GOOD)
    assert watcher.poll() == ()  # the stat says nothing changed: not read
    assert secrets.auth.password == WRONG
    refusals += 1
    assert watcher.poll() == ("auth.password",)
    assert secrets.auth.password == GOOD


async def test_reload_reads_every_file_and_reports_what_changed_and_what_kept_its_value(tmp_path, caplog):
    """SIGHUP's reload reads every file, whatever the stat says, and logs sidecar.reloaded naming the keys
    that changed and the keys whose file is bad (never a value)."""
    mount = MountedSecret(tmp_path / "secret", password=WRONG, api_key=KEY1)
    toml = _toml(
        tmp_path, f'password_file = "{mount.path("password")}"', f'[access]\napi_key_file = "{mount.path("api_key")}"'
    )
    secrets = Secrets(load_config(env={}, path=toml))
    watcher = SecretWatcher(secrets)
    assert watcher.reload() == ()
    mount.update(password=GOOD, api_key="")
    assert watcher.reload() == ("auth.password",)
    assert secrets.config.access.api_key == KEY1  # an empty key file keeps the key: the proxy never opens up
    assert _events(caplog, "sidecar.reloaded") == [
        {"files": 2, "changed": "none", "kept": "none"},
        {"files": 2, "changed": "auth.password", "kept": "access.api_key"},
    ]
    for secret in ALL_SECRETS:
        assert secret not in caplog.text


def test_an_empty_api_key_file_at_start_is_a_configuration_error(tmp_path):
    """access.api_key_file naming an empty file would let every client in: exit 2 naming the key."""
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match=r"access\.api_key_file: .*is empty"):
        load_config(
            env={}, path=_toml(tmp_path, f'password = "{GOOD}"', f'[access]\napi_key_file = "{tmp_path / "key"}"')
        )


def test_secret_files_are_remembered_from_toml_and_environment(tmp_path):
    """The files secrets came from, from TOML or OAUTH_SIDECAR_*_FILE, are what the watcher watches."""
    (tmp_path / "pw").write_text(GOOD)
    (tmp_path / "key").write_text(KEY1)
    config = load_config(
        env={"OAUTH_SIDECAR_ACCESS_API_KEY_FILE": str(tmp_path / "key")},
        path=_toml(tmp_path, f'password_file = "{tmp_path / "pw"}"'),
    )
    assert dict(config.secret_files) == {"auth.password": str(tmp_path / "pw"), "access.api_key": str(tmp_path / "key")}
    assert dict(load_config(env={}, path=_toml(tmp_path, f'password = "{GOOD}"')).secret_files) == {}


async def test_the_identity_provider_sends_the_secret_in_force_at_each_request(aiohttp_server):
    """IdentityProvider reads the password from the Secrets holder when it builds a request: a value put in
    force between two logins is the one the second sends."""
    idp = await start_idp(aiohttp_server, users={"demo": GOOD})
    config = keycloak_config(idp, "http://127.0.0.1:9", auth={"password": GOOD})
    secrets = Secrets(config)
    async with aiohttp.ClientSession() as session:
        provider = IdentityProvider(session, config.auth, config.inject, secrets=secrets)
        await provider.login()
        idp.users["demo"] = GOOD2
        secrets.put({"auth.password": GOOD2})
        await provider.login()
    assert [r["password"] for r in idp.requests] == [GOOD, GOOD2]


# --- python -m proxy, as a user runs it ----------------------------------------------------------


@pytest.mark.slow  # a real process, a refused login and a real second of login spacing
async def test_a_password_fixed_in_a_mounted_secret_logs_in_at_once_without_a_restart(aiohttp_server, tmp_path):
    """The sidecar starts with a wrong password from a mounted Secret and is refused (the next attempt a
    minute away); the Secret is updated as Kubernetes does it: within a couple of seconds the new password
    logs in (never two logins within a second), requests go through, the rotated API key is the one
    required, and the process never restarted."""
    idp = await start_idp(aiohttp_server, users={"demo": GOOD})
    _, api = await start_api(aiohttp_server, idp)
    mount = MountedSecret(tmp_path / "secret", password=WRONG, api_key=KEY1)
    config = write_config(
        tmp_path,
        idp.token_url(),
        api,
        password_file=mount.path("password"),
        api_key_file=mount.path("api_key"),
        grace=1,
    )
    sidecar = await Sidecar.start(config)
    loop = asyncio.get_running_loop()
    try:
        url = await sidecar.url()
        refused = await sidecar.wait_event("token.login_rejected")
        assert refused["retry_in_s"] > 30
        refused_at = loop.time()
        mount.update(password=GOOD, api_key=KEY2)
        await sidecar.wait_event("token.obtained", seconds=5)
        assert loop.time() - refused_at < 3 * POLL_INTERVAL_S  # not the minute of backoff
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            async with session.get(url + "/v1/hello", headers={"X-Api-Key": KEY2}) as resp:
                assert resp.status == 200
                assert (await resp.json())["subject"] == "demo"
            async with session.get(url + "/v1/hello", headers={"X-Api-Key": KEY1}) as resp:
                assert resp.status == 401
        assert sidecar.proc.returncode is None
        sidecar.proc.send_signal(signal.SIGTERM)
        assert await sidecar.exit_code() == 0
    finally:
        await sidecar.kill()
    assert [r["password"] for r in idp.requests if r["grant_type"] == "password"] == [WRONG, GOOD]
    assert sorted(e["key"] for e in sidecar.events("secret.rotated")) == ["access.api_key", "auth.password"]
    logins = [e["ts"] for e in sidecar.events("token.login_rejected") + sidecar.events("token.obtained")]
    assert logins[1] - logins[0] >= MIN_LOGIN_INTERVAL_S - 0.05
    text = "\n".join(sidecar.lines)
    for secret in ALL_SECRETS:
        assert secret not in text


@pytest.mark.slow  # a real process and a real login after SIGHUP
async def test_sighup_rereads_the_secrets_and_the_process_keeps_running(aiohttp_server, tmp_path):
    """SIGHUP (systemctl reload, a closed ssh session) does not end the process: it logs sidecar.reloaded
    and reads the secret files again; the password rewritten in place is the one the next login sends."""
    idp = await start_idp(aiohttp_server, users={"demo": GOOD})
    _, api = await start_api(aiohttp_server, idp)
    password = tmp_path / "password"
    password.write_text(GOOD + "\n")
    sidecar = await Sidecar.start(write_config(tmp_path, idp.token_url(), api, password_file=str(password), grace=1))
    try:
        url = await sidecar.url()
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            sidecar.proc.send_signal(signal.SIGHUP)
            assert (await sidecar.wait_event("sidecar.reloaded"))["changed"] == "none"
            idp.users["demo"] = GOOD2
            password.write_text(GOOD2 + "\n")
            sidecar.proc.send_signal(signal.SIGHUP)
            for _ in range(100):  # bounded: the second line comes within a moment
                if len(sidecar.events("sidecar.reloaded")) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(sidecar.events("sidecar.reloaded")) == 2
            assert [e["key"] for e in sidecar.events("secret.rotated")] == ["auth.password"]
            # The provider forgets the session: the upstream's 401 makes the proxy log in again.
            idp.revoke_all_access()
            idp.revoke_all_refresh()
            async with session.get(url + "/v1/hello") as resp:
                assert resp.status == 200
            async with session.get(url + "/-/healthy") as resp:
                assert resp.status == 200
        assert sidecar.proc.returncode is None
        sidecar.proc.send_signal(signal.SIGTERM)
        assert await sidecar.exit_code() == 0
    finally:
        await sidecar.kill()
    assert [r["password"] for r in idp.requests if r["grant_type"] == "password"] == [GOOD, GOOD2]
    text = "\n".join(sidecar.lines)
    for secret in ALL_SECRETS:
        assert secret not in text


def test_the_watched_keys_are_the_secret_keys(tmp_path):
    """Every secret key may come from a file and is then watched (config.SECRET_KEYS, nothing hard-coded)."""
    from proxy.config import SECRET_KEYS

    env = {}
    for section, key in SECRET_KEYS:
        (tmp_path / key).write_text("v" * 43 + key.replace("_", "-"))
        env[f"OAUTH_SIDECAR_{section.upper()}_{key.upper()}_FILE"] = str(tmp_path / key)
    env["OAUTH_SIDECAR_AUTH_GRANT_TYPE"] = "authorization_code"
    config = load_config(env=env, path=_toml(tmp_path, ""))
    watcher = SecretWatcher(Secrets(config))
    assert sorted(watcher.files) == sorted(f"{s}.{k}" for s, k in SECRET_KEYS)


async def test_a_refusal_right_after_a_change_is_news_for_it_once(tmp_path):
    """A login built just before the password changed can be refused just after: the change is then told
    again (so the new password is tried at once), once, and not for a refusal long after it."""
    file = tmp_path / "password"
    file.write_text(WRONG)
    secrets = Secrets(load_config(env={}, path=_toml(tmp_path, f'password_file = "{file}"', "timeout_s = 2\n")))
    refusals = 0
    told: list[tuple[str, ...]] = []
    watcher = SecretWatcher(secrets, refusals=lambda: refusals, on_change=told.append)
    watcher.poll()
    file.write_text(GOOD)
    assert watcher.poll() == ("auth.password",)
    refusals += 1
    watcher.poll()
    refusals += 1
    watcher.poll()
    assert told == [("auth.password",), ("auth.password",)]
    file.write_text(GOOD2)
    watcher.poll()
    for _ in range(4):  # past auth.timeout_s (2 s) of looks: a refusal now was of the new password
        watcher.poll()
    refusals += 1
    watcher.poll()
    assert told == [("auth.password",)] * 3


async def test_a_bug_while_watching_is_logged_by_type_and_watching_goes_on(tmp_path, caplog):
    """An exception in what a change sets off (here the callback) is logged as secret.watch_failed, by
    type and place, never its message; a SIGHUP reload does not raise and polling goes on."""
    file = tmp_path / "password"
    file.write_text(WRONG)
    secrets = Secrets(load_config(env={}, path=_toml(tmp_path, f'password_file = "{file}"')))

    def broken(keys: tuple[str, ...]) -> None:
        raise RuntimeError(f"quoting {secrets.auth.password}")

    vt = VirtualTime()
    watcher = SecretWatcher(secrets, on_change=broken, sleep=vt.sleep)
    file.write_text(GOOD)
    assert watcher.reload() == ()
    file.write_text(GOOD2)
    task = asyncio.create_task(watcher.run())
    try:
        await vt.run_for(POLL_INTERVAL_S * 2)
        assert not task.done()
    finally:
        task.cancel()
    failures = _events(caplog, "secret.watch_failed")
    assert [f["error"] for f in failures] == ["RuntimeError", "RuntimeError"]
    assert failures[0]["where"].startswith("test_rotation.py:")
    assert secrets.auth.password == GOOD2
    for secret in ALL_SECRETS:
        assert secret not in caplog.text
