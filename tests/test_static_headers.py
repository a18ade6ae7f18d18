"""[inject] headers: static upstream headers beside the token (an API gateway's subscription key).

Configuration (TOML, files, environment; every mistake exits 2 naming the key, never quoting a value) and
forwarding through the proxy to the demo API, which echoes the headers it received.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy import cli
from proxy.config import load_config
from proxy.observability import MASK, event, setup_logging
from tests.fakes.servers import ServerFactory, keycloak_config, start_api, start_idp, start_proxy

SUB_KEY = "apim-5ub5cr1pt10n-k3y"  # what a subscription key looks like: a secret
BASE_TOML = """\
[upstream]
url = "http://127.0.0.1:9"

[auth]
provider = "oauth2"
token_url = "http://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "c"
client_secret = "s3cr3t-s3cr3t"
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE_TOML + extra)
    return path


def test_toml_table_and_file(tmp_path: Path) -> None:
    """Values inline and from files (trailing newline stripped) end up in one mapping; all are secrets."""
    secret = tmp_path / "apim"
    secret.write_text(SUB_KEY + "\n")
    config = load_config(
        write(
            tmp_path,
            '[inject]\nheaders = {"X-Tenant" = "acme-tenant"}\n'
            f'headers_file = {{"Ocp-Apim-Subscription-Key" = "{secret}"}}\n',
        ),
        env={},
    )
    assert dict(config.inject.headers) == {"X-Tenant": "acme-tenant", "Ocp-Apim-Subscription-Key": SUB_KEY}
    assert {"acme-tenant", SUB_KEY} <= set(config.secrets())
    assert SUB_KEY not in repr(config)


def test_environment_forms(tmp_path: Path) -> None:
    """OAUTH_SIDECAR_INJECT_HEADERS and OAUTH_SIDECAR_INJECT_HEADERS_FILE take JSON objects."""
    secret = tmp_path / "apim"
    secret.write_text(SUB_KEY)
    env = {
        "OAUTH_SIDECAR_INJECT_HEADERS": json.dumps({"X-Tenant": "acme-tenant"}),
        "OAUTH_SIDECAR_INJECT_HEADERS_FILE": json.dumps({"Ocp-Apim-Subscription-Key": str(secret)}),
    }
    config = load_config(write(tmp_path, ""), env=env)
    assert dict(config.inject.headers) == {"X-Tenant": "acme-tenant", "Ocp-Apim-Subscription-Key": SUB_KEY}


BAD = {
    "bad name": ('headers = {"Bad Name" = "v4lue-v4lue"}', "inject.headers", "not a valid header name"),
    "colon": ('headers = {"X:Y" = "v4lue-v4lue"}', "inject.headers", "not a valid header name"),
    "CR LF": ('headers = {"X-Key" = "v4lue\\r\\nX-Evil: 1"}', "inject.headers", "without control characters"),
    "NUL": ('headers = {"X-Key" = "v4lue\\u0000"}', "inject.headers", "without control characters"),
    "non-ASCII": ('headers = {"X-Key" = "v4lué"}', "inject.headers", "ASCII"),
    "hop-by-hop": ('headers = {"Connection" = "v4lue-v4lue"}', "inject.headers", "cannot be set"),
    "Host": ('headers = {"host" = "v4lue-v4lue"}', "inject.headers", "cannot be set"),
    "Content-Length": ('headers = {"Content-Length" = "12"}', "inject.headers", "cannot be set"),
    "Transfer-Encoding": ('headers = {"Transfer-Encoding" = "chunked"}', "inject.headers", "cannot be set"),
    "underscore framing": ('headers = {"content_length" = "12"}', "inject.headers", "cannot be set"),
    "the token header": ('headers = {"Authorization" = "v4lue-v4lue"}', "inject.headers", "inject.header"),
    "not a string": ('headers = {"X-Key" = 12}', "inject.headers", "must be a string"),
    "twice": (
        'headers = {"X-Key" = "v4lue-v4lue"}\nheaders_file = {"x-key" = "/etc/hostname"}',
        "inject.headers_file",
        "given twice",
    ),
    "missing file": ('headers_file = {"X-Key" = "/nonexistent/apim"}', "inject.headers_file", "cannot read"),
    "not a table": ('headers = "X-Key: v4lue-v4lue"', "inject.headers", "must be a table"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_headers_exit_2_naming_the_key(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every bad name or value exits 2 with the key named, and never quotes the value."""
    line, key, problem = BAD[case]
    path = write(tmp_path, f"[inject]\n{line}\n")
    assert cli.main(["--config", str(path)], env={}) == 2
    err = capsys.readouterr().err
    assert key in err and problem in err, err
    assert "v4lue" not in err


def test_values_are_redacted_from_logs(tmp_path: Path) -> None:
    """A log line that happened to carry a static header's value shows the mask instead."""
    path = write(tmp_path, f'[inject]\nheaders = {{"Ocp-Apim-Subscription-Key" = "{SUB_KEY}"}}\n')
    config = load_config(path, env={})
    stream = io.StringIO()
    setup_logging("debug", "text", config.secrets(), stream=stream)
    event("request.failed", detail=f"upstream said: key {SUB_KEY} is over quota")
    assert SUB_KEY not in stream.getvalue() and MASK in stream.getvalue()


async def _echo_headers(client: Any, headers: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The headers the demo API received, as (lower-case name, value) pairs in order."""
    response = await client.get("/v1/anything", headers=headers or {})
    assert response.status == 200
    assert SUB_KEY not in json.dumps(dict(response.headers))
    return [(name.lower(), value) for name, value in (await response.json())["headers"]]


async def test_sent_upstream_and_the_clients_own_dropped(aiohttp_server: ServerFactory, aiohttp_client: Any) -> None:
    """The upstream gets the configured value; a client's header of that name (or its "_" twin) never
    reaches it, so a client can neither override the key nor send a second one."""
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    static = {"Ocp-Apim-Subscription-Key": SUB_KEY, "X-Tenant": "acme"}
    config = keycloak_config(idp, api_url, inject={"headers": static})
    client = await start_proxy(aiohttp_client, config)
    seen = await _echo_headers(
        client, {"Ocp-Apim-Subscription-Key": "client-forged", "Ocp_Apim_Subscription_Key": "client-forged-too"}
    )
    assert [v for n, v in seen if n.replace("_", "-") == "ocp-apim-subscription-key"] == [SUB_KEY]
    assert ("x-tenant", "acme") in seen
    assert "client-forged" not in json.dumps(seen)


async def test_sent_again_on_the_401_retry(aiohttp_server: ServerFactory, aiohttp_client: Any) -> None:
    """The retry after an upstream 401 (a renewed token) carries the static headers too."""
    idp = await start_idp(aiohttp_server)
    api, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, inject={"headers": {"Ocp-Apim-Subscription-Key": SUB_KEY}})
    client = await start_proxy(aiohttp_client, config)
    await _echo_headers(client)
    idp.revoke_all_access()
    seen = await _echo_headers(client)
    assert api.hits["invalid_token"] == 1  # the first attempt was refused, the retry went through
    assert ("ocp-apim-subscription-key", SUB_KEY) in seen


async def test_a_rotated_headers_file_is_sent_from_then_on(
    aiohttp_server: ServerFactory, aiohttp_client: Any, tmp_path: Path
) -> None:
    """A headers_file rewritten under the running proxy (a rotated subscription key) is read again by the
    secret watcher and sent from the next request on; a new value with a line break keeps the old one."""
    from proxy.app import FORWARDER, SECRETS
    from proxy.config import config_from_mapping
    from proxy.secrets import SecretWatcher

    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    key_file = tmp_path / "apim"
    key_file.write_text(SUB_KEY + "\n")
    base = keycloak_config(idp, api_url)
    config = config_from_mapping(
        {
            "upstream": {"url": base.upstream.url},
            "auth": {
                "provider": "keycloak",
                "token_url": base.auth.token_url,
                "client_id": base.auth.client_id,
                "username": base.auth.username,
                "password": base.auth.password,
            },
            "inject": {"headers_file": {"Ocp-Apim-Subscription-Key": str(key_file)}},
        }
    )
    assert config.secret_files == {"inject.headers.Ocp-Apim-Subscription-Key": str(key_file)}
    client = await start_proxy(aiohttp_client, config)
    app = client.server.app
    changes: list[tuple[str, ...]] = []

    def changed(keys: tuple[str, ...]) -> None:  # what cli.serve does with a change
        changes.append(keys)
        app[FORWARDER].set_static_headers(app[SECRETS].config.inject.headers)

    watcher = SecretWatcher(app[SECRETS], on_change=changed)
    watcher.poll()  # the first look reads every file: nothing new
    assert ("ocp-apim-subscription-key", SUB_KEY) in await _echo_headers(client)

    rotated = "apim-r0tat3d-k3y-2"
    key_file.write_text(rotated + "\n")
    assert watcher.poll() == ("inject.headers.Ocp-Apim-Subscription-Key",)
    seen = await _echo_headers(client)
    assert ("ocp-apim-subscription-key", rotated) in seen and SUB_KEY not in json.dumps(seen)

    key_file.write_text("forged\r\nX-Admin: yes\n")  # a value that would forge a header line
    assert watcher.poll() == ()
    assert "inject.headers.Ocp-Apim-Subscription-Key" in watcher.problems
    seen = await _echo_headers(client)
    assert ("ocp-apim-subscription-key", rotated) in seen and "x-admin" not in [n for n, _ in seen]
