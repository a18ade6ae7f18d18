"""Every token API the vendors document, spoken through its preset against a fake of that vendor's dialect.

Each preset: the sidecar logs in (the fake saw the right content type, field names and client
authentication), forwards with the right header, refreshes, and recovers from a rejected refresh.
Then the generic OAuth 2.0 grants, unusable token responses, and the presets' configuration.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import config_from_mapping, load_config
from proxy.demo import DemoIdP, Fault
from proxy.errors import ConfigError
from proxy.providers import OLI_TOKEN_URL, WE360_TOKEN_URL
from tests.fakes.servers import QUICK_LOGINS, start_api, start_idp, start_proxy
from tests.fakes.vendors import FORM, JSON, FakeOAuth2, FakeOIDCProvider, FakeWebCommander, start_fake

# A second login waits 50 ms, not 1 s: no test here is about the login spacing.

# A forced renewal (upstream 401) may follow another at once in these tests.
NO_401_INTERVAL = {"rejection_renewal_interval_s": 0.0}
WAIT_S = 8.0  # upper bound for anything a test waits for; on a quiet machine it takes a second or two


# --- helpers -------------------------------------------------------------------------------------


async def _proxy(aiohttp_client: Any, mapping: dict[str, Any], **manager: Any) -> Any:
    config = config_from_mapping({"listen": {"port": 0}, **mapping}, source="test")
    return await start_proxy(aiohttp_client, config, **{**NO_401_INTERVAL, **QUICK_LOGINS, **manager})


async def _eventually(check: Any, what: str) -> Any:
    """Await ``check()`` until it returns something truthy, within WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything our loggers wrote: messages and structured fields."""
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


def _assert_not_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    text = _logged(caplog)
    for secret in secrets:
        assert secret not in text


async def _json(client: Any, path: str, **kwargs: Any) -> tuple[int, Any]:
    resp = await client.get(path, **kwargs)
    return resp.status, await resp.json()


async def _status(client: Any) -> dict[str, Any]:
    return (await _json(client, "/-/status"))[1]


# --- we360 (Keycloak realm ind-prod, password grant, form, public client) --------------------------

WE360_USER, WE360_PASSWORD, WE360_CUSTOMER = "ops@example.com", "we360-pass-Zq81", "cust-4711"


async def test_we360_logs_in_forwards_refreshes_and_recovers(aiohttp_server, aiohttp_client, caplog):
    """we360: form login with the Customer ID as client_id, Bearer upstream, refresh, then login when refresh dies."""
    idp = await start_idp(
        aiohttp_server,
        realm="ind-prod",
        users={WE360_USER: WE360_PASSWORD},
        clients={WE360_CUSTOMER: None},
        send_expires_in=False,  # we360's Login API sample response has no expires_in: the JWT exp decides
    )
    api, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(
        aiohttp_client,
        {
            "upstream": {"url": api_url},
            "auth": {
                "provider": "we360",
                "token_url": idp.token_url(),
                "client_id": WE360_CUSTOMER,
                "username": WE360_USER,
                "password": WE360_PASSWORD,
            },
        },
    )
    status, body = await _json(client, "/v1/hello")
    assert (status, body["subject"]) == (200, WE360_USER)
    assert idp.requests == [
        {"client_id": WE360_CUSTOMER, "username": WE360_USER, "password": WE360_PASSWORD, "grant_type": "password"}
    ]
    assert idp.hits["bad_content_type"] == 0  # the demo IdP answers 415 to anything but a form
    assert 250 < (await _status(client))["token"]["expires_in_s"] <= 300  # from the JWT's exp

    first_refresh = next(iter(idp.refresh))
    idp.revoke_all_access()  # the upstream now answers 401: the sidecar refreshes and retries
    assert (await client.get("/v1/hello")).status == 200
    assert idp.requests[-1] == {
        "grant_type": "refresh_token",
        "refresh_token": first_refresh,
        "client_id": WE360_CUSTOMER,
    }

    idp.revoke_all_access()
    idp.revoke_all_refresh()  # the refresh is refused: we360 says "Call the Login API again"
    assert (await client.get("/v1/hello")).status == 200
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token", "refresh_token", "password"]
    assert api.rejected == ["unknown", "unknown"]  # the two 401s that triggered renewals; clients saw 200s
    assert _events(caplog, "token.refresh_rejected")[0]["next"] == "login"
    _assert_not_logged(caplog, WE360_PASSWORD, *idp.access, *idp.refresh, first_refresh)


@pytest.mark.slow(reason="about 2 s: two scheduled refreshes of 2 s tokens on real time")
async def test_we360_refreshes_before_expiry_without_failing_a_request(aiohttp_server, aiohttp_client):
    """With 2-second tokens the refresh happens on schedule; requests around it never see a 401 or a 503."""
    idp = await start_idp(
        aiohttp_server, realm="ind-prod", users={WE360_USER: WE360_PASSWORD}, clients={WE360_CUSTOMER: None}
    )
    idp.access_lifetime_s = 2.0
    api, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(
        aiohttp_client,
        {
            "upstream": {"url": api_url},
            "auth": {
                "provider": "we360",
                "token_url": idp.token_url(),
                "client_id": WE360_CUSTOMER,
                "username": WE360_USER,
                "password": WE360_PASSWORD,
            },
        },
    )

    async def refreshed_twice() -> bool:
        assert (await client.get("/v1/hello")).status == 200
        return idp.hits["grant:refresh_token"] >= 2

    await _eventually(refreshed_twice, "two scheduled refreshes")
    assert idp.hits["grant:password"] == 1
    assert api.rejected == []


# --- keycloak (any realm; issuer discovery; confidential clients) ---------------------------------


@pytest.mark.parametrize("client_auth", ["body", "basic"])
async def test_keycloak_via_issuer_discovery(aiohttp_server, aiohttp_client, caplog, client_auth):
    """keycloak + issuer: discovery once, a confidential client in the body or Basic, refresh, recovery, logout."""
    secret = "kc-secret:with/odd%chars"
    idp = await start_idp(aiohttp_server, realm="acme", users={"svc-user": "kc-pass-77"}, clients={"svc": secret})
    _, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(
        aiohttp_client,
        {
            "upstream": {"url": api_url},
            "auth": {
                "provider": "keycloak",
                "issuer": idp.issuer(),
                "client_id": "svc",
                "client_secret": secret,
                "client_auth": client_auth,
                "username": "svc-user",
                "password": "kc-pass-77",
                "revoke_on_shutdown": True,
            },
        },
    )
    status, body = await _json(client, "/v1/hello")
    assert (status, body["subject"]) == (200, "svc-user")
    login = idp.requests[0]
    if client_auth == "basic":  # the demo IdP accepted the secret from the Basic header
        assert "client_secret" not in login and "client_id" not in login
    else:
        assert (login["client_id"], login["client_secret"]) == ("svc", secret)

    idp.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200
    idp.revoke_all_access()
    idp.revoke_all_refresh()
    assert (await client.get("/v1/hello")).status == 200
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token", "refresh_token", "password"]
    assert idp.hits["discovery"] == 1  # found once, then cached
    assert _events(caplog, "idp.discovered")[0]["token_endpoint"] == idp.token_url()

    await client.close()  # revoke_on_shutdown: the discovered end_session_endpoint ends the session
    assert idp.hits["logout"] == 1
    _assert_not_logged(caplog, secret, "kc-pass-77")


async def test_keycloak_discovery_failure_is_a_clear_503(aiohttp_server, aiohttp_client):
    """An issuer whose discovery document is missing gives 503 naming the discovery URL, not a crash."""
    idp = await start_idp(aiohttp_server, realm="acme")
    api, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(
        aiohttp_client,
        {
            "upstream": {"url": api_url},
            "auth": {
                "provider": "keycloak",
                "issuer": idp.base_url + "/realms/no-such-realm",
                "client_id": "demo-client",
                "username": "demo",
                "password": "demo",
            },
        },
        transient_backoff=lambda attempt, rand, retry_after=None: 30.0,
    )
    status, body = await _json(client, "/v1/hello")
    assert status == 503
    assert "OpenID discovery" in body["detail"] and "/realms/no-such-realm/.well-known" in body["detail"]
    assert api.hits.total() == 0


async def test_keycloak_offline_token_means_no_password_is_stored(aiohttp_server, aiohttp_client, tmp_path, caplog):
    """The README recipe: a refresh token from a file (grant refresh_token) and no password in the config at all."""
    idp = await start_idp(aiohttp_server, realm="acme", users={"robot": "once-typed-pass"}, clients={"cli": None})
    _, api_url = await start_api(aiohttp_server, idp)
    # What the user does once, by hand (curl ... scope=offline_access): a password grant to get the token.
    async with aiohttp.ClientSession() as session:
        form = {"grant_type": "password", "client_id": "cli", "username": "robot", "password": "once-typed-pass"}
        async with session.post(idp.token_url(), data=form) as resp:
            offline = (await resp.json())["refresh_token"]
    secret_file = tmp_path / "offline-token"
    secret_file.write_text(offline + "\n")
    config = load_config(
        None,
        env={
            "OAUTH_SIDECAR_UPSTREAM_URL": api_url,
            "OAUTH_SIDECAR_AUTH_PROVIDER": "keycloak",
            "OAUTH_SIDECAR_AUTH_TOKEN_URL": idp.token_url(),
            "OAUTH_SIDECAR_AUTH_CLIENT_ID": "cli",
            "OAUTH_SIDECAR_AUTH_GRANT_TYPE": "refresh_token",
            "OAUTH_SIDECAR_AUTH_REFRESH_TOKEN_FILE": str(secret_file),
            "OAUTH_SIDECAR_LISTEN_PORT": "0",
        },
    )
    assert config.auth.password == "" and config.auth.refresh_token == offline
    client = await start_proxy(aiohttp_client, config, **NO_401_INTERVAL, **QUICK_LOGINS)
    assert (await client.get("/v1/hello")).status == 200
    idp.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200
    sidecar_requests = idp.requests[1:]
    assert [r["grant_type"] for r in sidecar_requests] == ["refresh_token", "refresh_token"]
    assert sidecar_requests[0]["refresh_token"] == offline
    assert sidecar_requests[1]["refresh_token"] != offline  # Keycloak rotated it; the sidecar keeps the newest
    assert all("password" not in r for r in sidecar_requests)
    _assert_not_logged(caplog, offline)


# --- oli (Keycloak realm api under /auth, client apiclient, 300 s / 1800 s) ----------------------


async def _start_oli(aiohttp_server: Any, **options: Any) -> DemoIdP:
    """A Keycloak realm `api` served under /auth, like auth.olisystems.com/auth/realms/api/..."""
    idp = DemoIdP(realm="api", users={"oli-user": "oli-pass-3k"}, clients={"apiclient": None}, **options)
    root = web.Application()
    root.add_subapp("/auth", idp.app())
    server = await aiohttp_server(root)
    idp.base_url = str(server.make_url("/auth")).rstrip("/")
    return idp


def _oli_mapping(idp: DemoIdP, api_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": api_url},
        "auth": {"provider": "oli", "token_url": idp.token_url(), "username": "oli-user", "password": "oli-pass-3k"},
    }


async def test_oli_logs_in_forwards_refreshes_and_recovers(aiohttp_server, aiohttp_client, caplog):
    """oli: form login as apiclient, the sample's 300/1800 s lifetimes honoured, refresh, login after a dead refresh."""
    idp = await _start_oli(aiohttp_server, access_lifetime_s=300, refresh_lifetime_s=1800)
    _, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(aiohttp_client, _oli_mapping(idp, api_url))
    status, body = await _json(client, "/v1/hello")
    assert (status, body["subject"]) == (200, "oli-user")
    assert idp.requests[0] == {
        "grant_type": "password",
        "username": "oli-user",
        "password": "oli-pass-3k",
        "client_id": "apiclient",
    }
    token = (await _status(client))["token"]
    assert 290 < token["expires_in_s"] <= 300
    assert 230 < token["refresh_in_s"] <= 240  # refresh_margin_s 60 before expiry: every few minutes

    idp.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200
    assert idp.requests[-1]["grant_type"] == "refresh_token"
    assert idp.requests[-1]["client_id"] == "apiclient"
    idp.revoke_all_access()
    idp.revoke_all_refresh()
    assert (await client.get("/v1/hello")).status == 200
    assert [r["grant_type"] for r in idp.requests] == ["password", "refresh_token", "refresh_token", "password"]
    _assert_not_logged(caplog, "oli-pass-3k")


async def test_oli_expired_refresh_token_is_not_presented(aiohttp_server, aiohttp_client):
    """When refresh_expires_in says the refresh token is dead by renewal time, the sidecar logs in instead."""
    idp = await _start_oli(aiohttp_server, access_lifetime_s=2, refresh_lifetime_s=2)
    api, api_url = await start_api(aiohttp_server, idp)
    client = await _proxy(aiohttp_client, _oli_mapping(idp, api_url))

    async def logged_in_again() -> bool:
        assert (await client.get("/v1/hello")).status == 200
        return idp.hits["grant:password"] >= 2

    await _eventually(logged_in_again, "a second login")
    assert idp.hits["grant:refresh_token"] == 0
    assert api.rejected == []


# --- webcommander (JSON, auth_string, access_token header, refresh undocumented) ------------------

WC_USER, WC_PASSWORD = "shop@example.com", "wc-password-1"


def _wc_mapping(fake: FakeWebCommander, **extra: dict[str, Any]) -> dict[str, Any]:
    mapping: dict[str, Any] = {
        "upstream": {"url": fake.base_url},  # the store; the token endpoint is {store}/api/v4/oauth2/token
        "auth": {
            "provider": "webcommander",
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "username": WC_USER,
            "password": WC_PASSWORD,
            "redirect_uri": fake.redirect_uri,
        },
    }
    for section, values in extra.items():
        mapping.setdefault(section, {}).update(values)
    return mapping


async def test_webcommander_logs_in_and_sends_the_access_token_header(aiohttp_server, aiohttp_client, caplog):
    """webcommander: a JSON client_credentials request with auth_string; the token goes upstream as `access_token`."""
    fake = await start_fake(aiohttp_server, FakeWebCommander())
    client = await _proxy(aiohttp_client, _wc_mapping(fake))
    resp = await client.get("/api/v4/product", headers={"access_token": "forged-by-client", "Authorization": "x y"})
    assert resp.status == 200
    assert (await resp.json())["subject"] == WC_USER
    [login] = fake.seen
    assert login.content_type == JSON
    assert login.fields == {
        "grant_type": "client_credentials",
        "auth_string": base64.b64encode(f"{WC_USER}:{WC_PASSWORD}".encode()).decode(),
        "redirect_uri": fake.redirect_uri,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
    }
    assert login.basic is None
    arrived = {k.lower(): v for k, v in fake.api_calls[-1].headers.items()}
    assert arrived["access_token"] == fake.handed_out[0]  # the docs' example header, the bare token
    assert "authorization" not in arrived
    assert 3590 < (await _status(client))["token"]["expires_in_s"] <= 3600
    _assert_not_logged(caplog, WC_PASSWORD, fake.client_secret, login.fields["auth_string"], *fake.handed_out)


async def test_webcommander_refused_refresh_falls_back_to_login(aiohttp_server, aiohttp_client, caplog):
    """A refused refresh_token grant (400 unsupported_grant_type) becomes a client_credentials login, then the rule."""
    fake = await start_fake(aiohttp_server, FakeWebCommander())
    client = await _proxy(aiohttp_client, _wc_mapping(fake))
    assert (await client.get("/api/v4/product")).status == 200

    fake.revoke_all_access()
    assert (await client.get("/api/v4/product")).status == 200
    assert [s.grant for s in fake.seen] == ["client_credentials", "refresh_token", "client_credentials"]
    refresh = fake.seen[1]
    assert refresh.content_type == JSON
    assert refresh.fields["refresh_token"] == fake.handed_out[1]  # the refresh token of the first login
    assert _events(caplog, "idp.refresh_unsupported")

    fake.revoke_all_access()  # the next renewal does not try the refused grant again
    assert (await client.get("/api/v4/product")).status == 200
    assert [s.grant for s in fake.seen] == [
        "client_credentials",
        "refresh_token",
        "client_credentials",
        "client_credentials",
    ]
    assert (await _status(client))["token"]["has_refresh_token"] is False


async def test_webcommander_refresh_is_used_when_the_store_supports_it(aiohttp_server, aiohttp_client):
    """A store that accepts grant_type=refresh_token gets refreshes; a dead refresh token still ends in a login."""
    fake = await start_fake(aiohttp_server, FakeWebCommander(refresh_supported=True))
    client = await _proxy(aiohttp_client, _wc_mapping(fake))
    assert (await client.get("/api/v4/product")).status == 200
    fake.revoke_all_access()
    assert (await client.get("/api/v4/product")).status == 200
    assert fake.seen[-1].grant == "refresh_token"
    assert fake.seen[-1].fields["client_secret"] == fake.client_secret
    fake.revoke_all_access()
    fake.revoke_all_refresh()
    assert (await client.get("/api/v4/product")).status == 200
    assert [s.grant for s in fake.seen] == [
        "client_credentials",
        "refresh_token",
        "refresh_token",
        "client_credentials",
    ]


async def test_webcommander_authorization_header_via_inject(aiohttp_server, aiohttp_client):
    """[inject] header = "Authorization", value = "Bearer {token}" switches to the docs' summary wording."""
    fake = await start_fake(aiohttp_server, FakeWebCommander(api_header="Authorization", api_prefix="Bearer "))
    mapping = _wc_mapping(fake, inject={"header": "Authorization", "value": "Bearer {token}"})
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/api/v4/product")).status == 200
    arrived = {k.lower(): v for k, v in fake.api_calls[-1].headers.items()}
    assert arrived["authorization"] == f"Bearer {fake.handed_out[0]}"
    assert "access_token" not in arrived


async def test_webcommander_wrong_password_is_a_clear_503(aiohttp_server, aiohttp_client, caplog):
    """A refused auth_string gives not-ready with the store's error, once, not a login loop."""
    fake = await start_fake(aiohttp_server, FakeWebCommander())
    mapping = _wc_mapping(fake, auth={"password": "wrong-password-9"})
    client = await _proxy(aiohttp_client, mapping, rejected_backoff=lambda attempt, rand: 60.0)
    status, body = await _json(client, "/api/v4/product")
    assert status == 503
    assert "invalid_grant" in body["detail"] and "Invalid username or password" in body["detail"]
    assert fake.hits["grant:client_credentials"] == 1
    assert fake.api_calls == []
    _assert_not_logged(caplog, "wrong-password-9")


# --- oauth2: the generic RFC 6749 provider --------------------------------------------------------

O2_CLIENT, O2_SECRET = "BA779C49-client", "4AD3CE00:se/cr%41et+x y"
O2_USER, O2_PASSWORD = "jsmith", "password123"


def _o2_mapping(fake: FakeOAuth2, **auth: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": fake.base_url},
        "auth": {
            "provider": "oauth2",
            "token_url": fake.token_url,
            "client_id": O2_CLIENT,
            "client_secret": O2_SECRET,
            **auth,
        },
    }


def _o2_fake(**options: Any) -> FakeOAuth2:
    return FakeOAuth2(clients={O2_CLIENT: O2_SECRET}, users={O2_USER: O2_PASSWORD}, **options)


@pytest.mark.parametrize("body", ["form", "json"])
@pytest.mark.parametrize("client_auth", ["body", "basic"])
async def test_oauth2_password_grant_each_encoding(aiohttp_server, aiohttp_client, caplog, body, client_auth):
    """oauth2 password grant in each body/client_auth combination: login, rotated refreshes, login after a dead one."""
    content_type = {"form": FORM, "json": JSON}[body]
    # The fake accepts only this combination, so every 200 proves the sidecar used it.
    fake = await start_fake(aiohttp_server, _o2_fake(bodies=(content_type,), client_auth=(client_auth,)))
    mapping = _o2_mapping(
        fake, grant_type="password", username=O2_USER, password=O2_PASSWORD, body=body, client_auth=client_auth
    )
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    login = fake.seen[0]
    assert login.content_type == content_type
    assert login.fields["grant_type"] == "password"
    assert (login.fields["username"], login.fields["password"]) == (O2_USER, O2_PASSWORD)
    if client_auth == "basic":
        assert login.basic == (O2_CLIENT, O2_SECRET)  # form-urlencoded, then base64 (RFC 6749 §2.3.1)
        assert "client_id" not in login.fields and "client_secret" not in login.fields
    else:
        assert login.basic is None
        assert (login.fields["client_id"], login.fields["client_secret"]) == (O2_CLIENT, O2_SECRET)
    arrived = {k.lower(): v for k, v in fake.api_calls[-1].headers.items()}
    assert arrived["authorization"] == f"Bearer {fake.handed_out[0]}"

    for _ in range(2):  # each refresh rotates the refresh token; sending an old one would be refused
        fake.revoke_all_access()
        assert (await client.get("/v1/hello")).status == 200
    refreshes = fake.grants("refresh_token")
    assert [r.fields["refresh_token"] for r in refreshes] == [fake.handed_out[1], fake.handed_out[3]]
    assert all(r.content_type == content_type and (r.basic is not None) == (client_auth == "basic") for r in refreshes)
    assert len(fake.grants("password")) == 1

    fake.revoke_all_access()
    fake.revoke_all_refresh()
    assert (await client.get("/v1/hello")).status == 200
    assert [s.grant for s in fake.seen][-2:] == ["refresh_token", "password"]
    _assert_not_logged(caplog, O2_SECRET, O2_PASSWORD, *fake.handed_out)


async def test_oauth2_client_credentials_just_fetches_a_new_token(aiohttp_server, aiohttp_client):
    """client_credentials, no refresh token: every renewal (scheduled or after a 401) is a new client_credentials."""
    fake = await start_fake(aiohttp_server, _o2_fake(expires_in=2, client_credentials_refresh=False))  # RFC 6749 §4.4.3
    client = await _proxy(aiohttp_client, _o2_mapping(fake, grant_type="client_credentials", body="json"))
    assert (await client.get("/v1/hello")).status == 200
    assert fake.seen[0].content_type == JSON
    assert fake.seen[0].fields == {
        "grant_type": "client_credentials",
        "client_id": O2_CLIENT,
        "client_secret": O2_SECRET,
    }

    async def renewed() -> bool:
        assert (await client.get("/v1/hello")).status == 200
        return len(fake.grants("client_credentials")) >= 2

    await _eventually(renewed, "a scheduled renewal")
    fake.revoke_all_access()
    before = len(fake.grants("client_credentials"))
    assert (await client.get("/v1/hello")).status == 200
    assert len(fake.grants("client_credentials")) == before + 1
    assert fake.grants("refresh_token") == []
    assert (await _status(client))["token"]["has_refresh_token"] is False


async def test_oauth2_refresh_token_grant_starts_from_the_configured_token(aiohttp_server, aiohttp_client, caplog):
    """grant refresh_token: the configured token first, then the newest; when that dies, never the configured one
    again (it was rotated away: presenting it would be refresh-token reuse), but not-ready saying so."""
    fake = await start_fake(aiohttp_server, _o2_fake(rotate_refresh=False))
    configured = fake.add_refresh_token(O2_USER)
    client = await _proxy(aiohttp_client, _o2_mapping(fake, grant_type="refresh_token", refresh_token=configured))
    assert (await client.get("/v1/hello")).status == 200
    fake.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200
    sent = [s.fields["refresh_token"] for s in fake.seen]
    assert sent == [configured, fake.handed_out[2]]  # handed_out: configured, access 1, refresh 1, ...
    assert all("password" not in s.fields and "username" not in s.fields for s in fake.seen)
    assert [e["refresh_token"] for e in _events(caplog, "token.obtained")] == ["new", "rotated"]

    del fake.refresh[fake.handed_out[4]]  # the newest refresh token dies (the fake keeps the configured one)
    fake.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 401  # the upstream's: no token to retry with
    assert [s.fields["refresh_token"] for s in fake.seen] == [configured, fake.handed_out[2], fake.handed_out[4]]
    status, body = await _json(client, "/-/ready")
    assert status == 503 and "auth.refresh_token" in body["detail"] and "rotated away" in body["detail"]
    _assert_not_logged(caplog, configured, *fake.handed_out)


async def test_oauth2_dead_configured_refresh_token_is_not_ready_with_reason(aiohttp_server, aiohttp_client):
    """A configured refresh token the provider refuses: 503 saying so, and no retry loop against the provider."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    mapping = _o2_mapping(fake, grant_type="refresh_token", refresh_token="fake-rt-long-gone")
    client = await _proxy(aiohttp_client, mapping, rejected_backoff=lambda attempt, rand: 60.0)

    async def rejected() -> Any:
        status, body = await _json(client, "/-/ready")
        assert status == 503
        return body if body["state"] == "rejected" else None

    body = await _eventually(rejected, "the login to be rejected")
    assert "invalid_grant: Invalid refresh token" in body["detail"]
    status, body = await _json(client, "/v1/hello")
    assert (status, body["error"]) == (503, "no_token")
    assert "Invalid refresh token" in body["detail"]
    assert len(fake.seen) == 1


@pytest.mark.slow(reason="about 3 s: 2 s tokens refreshed on real time until their refresh token dies")
async def test_oauth2_authorization_code_is_exchanged_once(aiohttp_server, aiohttp_client, caplog):
    """authorization_code: one exchange, then refresh tokens; when those die, not-ready with the reason, code unsent."""
    fake = await start_fake(aiohttp_server, _o2_fake(expires_in=2))
    code = fake.add_code(O2_USER, redirect_uri="https://app.example/callback")
    mapping = _o2_mapping(fake, grant_type="authorization_code", code=code, redirect_uri="https://app.example/callback")
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    exchange = fake.seen[0]
    assert exchange.fields == {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "https://app.example/callback",
        "client_id": O2_CLIENT,
        "client_secret": O2_SECRET,
    }

    async def refreshed() -> bool:
        assert (await client.get("/v1/hello")).status == 200
        return len(fake.grants("refresh_token")) >= 1

    await _eventually(refreshed, "a scheduled refresh")

    fake.revoke_all_refresh()

    async def not_ready() -> Any:
        status, body = await _json(client, "/-/ready")
        return body if status == 503 else None

    body = await _eventually(not_ready, "not-ready once the refresh token is dead")
    assert "authorization code" in body["detail"] and "never sent twice" in body["detail"]
    status, body = await _json(client, "/v1/hello")
    assert (status, body["error"]) == (503, "no_token")
    assert "get a new code" in body["detail"]
    assert len(fake.grants("authorization_code")) == 1  # never re-sent
    assert any(e["error"] == "code_already_used" for e in _events(caplog, "token.login_rejected"))
    _assert_not_logged(caplog, code)


async def test_oauth2_authorization_code_survives_a_server_error(aiohttp_server, aiohttp_client):
    """A 503 from the token endpoint leaves the code unspent: it is sent again after the backoff, and works."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    code = fake.add_code(O2_USER)
    fake.fail_next(Fault(503, {"error": "temporarily_unavailable"}))
    client = await _proxy(aiohttp_client, _o2_mapping(fake, grant_type="authorization_code", code=code))

    async def ready() -> bool:
        return (await client.get("/-/ready")).status == 200

    await _eventually(ready, "ready after the retry")
    assert [s.fields["code"] for s in fake.grants("authorization_code")] == [code, code]
    assert (await client.get("/v1/hello")).status == 200


async def test_oauth2_lowercase_bearer_is_accepted(aiohttp_server, aiohttp_client):
    """token_type "bearer" (OLI's sample spelling) is the same as "Bearer"; a missing token_type is accepted too."""
    for token_type in ("bearer", None):
        fake = await start_fake(aiohttp_server, _o2_fake(token_type=token_type))
        client = await _proxy(aiohttp_client, _o2_mapping(fake, grant_type="client_credentials"))
        assert (await client.get("/v1/hello")).status == 200


# --- unusable token responses ---------------------------------------------------------------------

LEAKY = "fake-at-must-never-be-logged-0001"
HTML_500 = "<!DOCTYPE html><html><head><title>500</title></head><body><h1>Internal Server Error</h1></body></html>"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(500, HTML_500), "token endpoint answered 500 (an HTML page without an OAuth error)"),
        (Fault(200, {"token_type": "Bearer", "expires_in": 3600}), "token response has no access_token"),
        (
            Fault(200, {"error": "temporarily_unavailable", "error_description": "nope"}),
            "token response has no access_token (error: temporarily_unavailable: nope)",
        ),
        (
            Fault(200, {"access_token": LEAKY, "token_type": "Bearer", "expires_in": "one hour"}),
            "expires_in that is not a number ('one hour')",
        ),
        (
            Fault(200, {"access_token": LEAKY, "token_type": "Bearer", "expires_in": "Infinity"}),
            "expires_in that is not a number ('Infinity')",
        ),
        (
            Fault(200, {"access_token": LEAKY, "token_type": "mac", "mac_key": "k", "expires_in": 3600}),
            "token_type 'mac' is not supported",
        ),
        (Fault(200, "<html><body>Sign in</body></html>"), "answered 200 with an HTML page, not a JSON object"),
        (
            Fault(200, {"access_token": LEAKY + "\u00e9", "token_type": "Bearer", "expires_in": 3600}),
            "access_token with spaces, control or non-ASCII characters",
        ),
    ],
    ids=[
        "html-500",
        "no-access-token",
        "200-with-error",
        "expires-in-text",
        "expires-in-infinity",
        "mac",
        "html-200",
        "non-ascii-token",
    ],
)
async def test_unusable_token_response_is_a_clear_503(aiohttp_server, aiohttp_client, caplog, fault, reason):
    """An unusable token response: a warning naming the problem, 503 with it in `detail`, recovery once it is fixed."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    fake.fail_always(fault)
    client = await _proxy(
        aiohttp_client,
        _o2_mapping(fake, grant_type="client_credentials"),
        transient_backoff=lambda attempt, rand, retry_after=None: 0.3,
    )
    resp = await client.get("/v1/hello")
    body = await resp.json()
    assert resp.status == 503
    assert body["error"] == "no_token"
    assert reason in body["detail"]
    assert int(resp.headers["Retry-After"]) >= 1
    warnings = [
        r
        for r in caplog.records
        if r.getMessage() == "token.unavailable" and reason in getattr(r, "fields", {}).get("detail", "")
    ]
    assert warnings and warnings[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.getMessage() == "token.flight_crashed"]
    assert fake.api_calls == []
    assert (await client.get("/-/healthy")).status == 200
    assert reason in (await _status(client))["last_error"]["detail"]

    fake.fail_always(None)

    async def recovered() -> bool:
        return (await client.get("/v1/hello")).status == 200

    await _eventually(recovered, "recovery after the provider is fixed")
    _assert_not_logged(caplog, LEAKY, O2_SECRET, *fake.handed_out)


async def test_absurd_expires_in_is_capped(aiohttp_server, aiohttp_client):
    """expires_in 1e300 is cut to a year: the token is used and /-/status still shows a date."""
    fake = await start_fake(aiohttp_server, _o2_fake(expires_in=1e300))
    client = await _proxy(aiohttp_client, _o2_mapping(fake, grant_type="client_credentials"))
    assert (await client.get("/v1/hello")).status == 200
    token = (await _status(client))["token"]
    assert 364 * 86400 < token["expires_in_s"] <= 365 * 86400
    assert token["expires_at"].endswith("Z")


# --- configuration of the presets -----------------------------------------------------------------


def _config(auth: dict[str, Any], upstream: str | None = "https://api.example.com", **sections: Any) -> Any:
    mapping: dict[str, Any] = {"auth": auth, **sections}
    if upstream is not None:
        mapping["upstream"] = {"url": upstream}
    return config_from_mapping(mapping, source="test.toml")


ISSUER = "https://sso.example.com/realms/reports"


@pytest.mark.parametrize("provider", ["we360", "oli", "keycloak", "oauth2"])
def test_an_issuer_replaces_the_token_url_for_any_provider(provider):
    """An issuer the user gives is used (OpenID discovery), never silently ignored for a preset's URL."""
    auth = {"provider": provider, "issuer": ISSUER, "client_id": "c", "username": "u", "password": "p"}
    config = _config(auth)
    assert config.auth.issuer == ISSUER
    assert config.auth.token_url == ""


def test_token_url_and_issuer_together_are_refused():
    auth = {"provider": "keycloak", "issuer": ISSUER, "token_url": ISSUER + "/protocol/openid-connect/token"}
    with pytest.raises(ConfigError) as caught:
        _config({**auth, "client_id": "c", "username": "u", "password": "p"})
    assert "auth.issuer" in str(caught.value) and "not both" in str(caught.value)


def test_we360_needs_only_customer_id_user_and_password():
    """provider we360 fills the ind-prod token URL, the API URL, the password grant, form and Bearer."""
    config = _config({"client_id": "cust-1", "username": "u@example.com", "password": "p"}, upstream=None)
    auth = config.auth
    assert (auth.provider, auth.token_url, config.upstream.url) == ("we360", WE360_TOKEN_URL, "https://api.in.we360.ai")
    assert (auth.grant_type, auth.body, auth.client_auth) == ("password", "form", "body")
    assert (config.inject.header, config.inject.value) == ("Authorization", "Bearer {token}")
    assert auth.logout_url == WE360_TOKEN_URL.removesuffix("/token") + "/logout"


def test_oli_fills_token_url_and_client_id():
    """provider oli: the OLI token URL (under /auth) and client_id apiclient; a user's client_id overrides it."""
    config = _config({"provider": "oli", "username": "u", "password": "p"})
    assert (config.auth.token_url, config.auth.client_id) == (OLI_TOKEN_URL, "apiclient")
    assert (config.inject.header, config.inject.value) == ("Authorization", "Bearer {token}")
    other = _config({"provider": "oli", "username": "u", "password": "p", "client_id": "apiclient2"})
    assert other.auth.client_id == "apiclient2"


@pytest.mark.parametrize(
    ("store", "token_url"),
    [
        ("https://shop.example.com", "https://shop.example.com/api/v4/oauth2/token"),
        ("https://shop.example.com/", "https://shop.example.com/api/v4/oauth2/token"),
        ("https://example.com/store/", "https://example.com/store/api/v4/oauth2/token"),
    ],
)
def test_webcommander_token_url_comes_from_the_store_url(store, token_url):
    """webcommander: token_url = upstream.url + /api/v4/oauth2/token; JSON, auth_string, the access_token header."""
    auth = {
        "provider": "webcommander",
        "client_id": "c",
        "client_secret": "s",
        "username": "u",
        "password": "p",
        "redirect_uri": "https://example.com/cb",
    }
    config = _config(auth, upstream=store)
    assert config.auth.token_url == token_url
    assert (config.auth.grant_type, config.auth.body, config.auth.auth_string) == ("client_credentials", "json", True)
    assert (config.inject.header, config.inject.value) == ("access_token", "{token}")
    explicit = _config({**auth, "token_url": "https://auth.example.com/token"}, upstream=store)
    assert explicit.auth.token_url == "https://auth.example.com/token"
    switched = _config(auth, upstream=store, inject={"header": "Authorization", "value": "Bearer {token}"})
    assert (switched.inject.header, switched.inject.value) == ("Authorization", "Bearer {token}")


@pytest.mark.parametrize(
    ("auth", "key", "words"),
    [
        ({"username": "u", "password": "p"}, "auth.client_id", "Customer ID"),
        ({"client_id": "c", "password": "p"}, "auth.username", "email address"),
        ({"client_id": "c", "username": "u"}, "auth.password", "OAUTH_SIDECAR_AUTH_PASSWORD"),
        ({"provider": "oli", "password": "p"}, "auth.username", "OLI"),
        ({"provider": "keycloak", "client_id": "c", "username": "u", "password": "p"}, "auth.token_url", "issuer"),
        ({"provider": "oauth2", "client_id": "c", "grant_type": "client_credentials"}, "auth.token_url", "oauth2"),
        (
            {"provider": "webcommander", "client_id": "c", "username": "u", "password": "p", "redirect_uri": "x"},
            "auth.client_secret",
            "client secret",
        ),
        (
            {"provider": "webcommander", "client_id": "c", "client_secret": "s", "username": "u", "redirect_uri": "x"},
            "auth.password",
            "password_file",
        ),
        (
            {"provider": "webcommander", "client_id": "c", "client_secret": "s", "username": "u", "password": "p"},
            "auth.redirect_uri",
            "redirect URI",
        ),
        (
            {"provider": "oauth2", "token_url": "https://a.example/t", "grant_type": "authorization_code"},
            "auth.code",
            "authorization_code",
        ),
        (
            {"provider": "oauth2", "token_url": "https://a.example/t", "grant_type": "refresh_token"},
            "auth.refresh_token",
            "refresh_token_file",
        ),
    ],
)
def test_missing_preset_keys_are_named(auth, key, words):
    """Each preset's required keys: a missing one is a ConfigError naming the key and saying what it is."""
    with pytest.raises(ConfigError) as info:
        _config(auth)
    assert info.value.key == key
    assert words in info.value.problem
    assert str(info.value).startswith("test.toml: ")


def test_implicit_grant_is_refused_with_the_reason():
    """grant_type implicit is refused at config time: browser-only, no refresh token, token in a URL."""
    with pytest.raises(ConfigError) as info:
        _config({"provider": "oauth2", "token_url": "https://a.example/t", "grant_type": "implicit", "client_id": "c"})
    assert info.value.key == "auth.grant_type"
    assert "browser" in info.value.problem and "refresh token" in info.value.problem


def test_unknown_provider_lists_the_known_ones():
    """A misspelt provider names every preset."""
    with pytest.raises(ConfigError) as info:
        _config({"provider": "keycloack"})
    assert info.value.key == "auth.provider"
    for name in ("we360", "keycloak", "oli", "webcommander", "oauth2"):
        assert name in info.value.problem


def test_refresh_token_grant_needs_no_password():
    """grant refresh_token with keycloak needs a token_url or issuer, client_id and the refresh token: nothing else."""
    config = _config(
        {"provider": "keycloak", "issuer": "https://sso.example.com/realms/x", "grant_type": "refresh_token"}
        | {"client_id": "cli", "refresh_token": "offline-token-value"}
    )
    assert (config.auth.username, config.auth.password) == ("", "")
    assert config.auth.token_url == ""  # found by discovery at run time
    assert "offline-token-value" not in repr(config)


def test_webcommander_store_must_be_https():
    """The store URL is where the token endpoint is derived from, so it must be https:// (or loopback)."""
    auth = {
        "provider": "webcommander",
        "client_id": "c",
        "client_secret": "s",
        "username": "u",
        "password": "p",
        "redirect_uri": "https://example.com/cb",
    }
    with pytest.raises(ConfigError) as info:
        _config(auth, upstream="http://shop.example.com")
    assert info.value.key == "upstream.url"
    assert "https://" in info.value.problem
    assert _config(auth, upstream="http://127.0.0.1:9000").auth.token_url == "http://127.0.0.1:9000/api/v4/oauth2/token"


@pytest.mark.parametrize(
    ("body", "expected"), [("form", {"lang": "en", "days": "7", "offline": "true"}), ("json", None)]
)
async def test_extra_values_keep_their_toml_types(aiohttp_server, aiohttp_client, body, expected):
    """A JSON token body sends TOML's 7 and true as JSON's 7 and true; a form sends "7" and "true" (not "True")."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    extra = {"lang": "en", "days": 7, "offline": True}
    mapping = _o2_mapping(fake, grant_type="client_credentials", body=body, extra=extra)
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    seen = fake.seen[0]
    if body == "json":
        assert seen.raw_json is not None
        assert {k: seen.raw_json[k] for k in extra} == extra
    else:
        assert {k: seen.fields[k] for k in extra} == expected


async def test_extra_fields_reach_the_token_endpoint(aiohttp_server, aiohttp_client):
    """auth.extra fields arrive with the login and the refresh, and cannot override the grant's own fields."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    mapping = _o2_mapping(
        fake,
        grant_type="password",
        username=O2_USER,
        password=O2_PASSWORD,
        extra={"audience": "reports", "grant_type": "implicit"},
    )
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    fake.revoke_all_access()
    assert (await client.get("/v1/hello")).status == 200
    assert [(s.grant, s.fields["audience"]) for s in fake.seen] == [
        ("password", "reports"),
        ("refresh_token", "reports"),
    ]


# --- ending a session, PKCE, hints (issue #12) ------------------------------------------------------


async def test_revoke_on_shutdown_with_a_non_keycloak_issuer_revokes_the_refresh_token(
    aiohttp_server, aiohttp_client, caplog
):
    """oauth2 + issuer on a certified OpenID Provider: discovery's end_session_endpoint (a browser page that
    answers 200 HTML) is not taken for Keycloak's logout; the newest refresh token is revoked (RFC 7009, with
    token_type_hint) and really dies."""
    fake = await start_fake(
        aiohttp_server, FakeOIDCProvider(clients={O2_CLIENT: O2_SECRET}, users={O2_USER: O2_PASSWORD})
    )
    mapping = {
        "upstream": {"url": fake.base_url},
        "auth": {
            "provider": "oauth2",
            "issuer": fake.base_url,
            "client_id": O2_CLIENT,
            "client_secret": O2_SECRET,
            "username": O2_USER,
            "password": O2_PASSWORD,
            "revoke_on_shutdown": True,
        },
    }
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    [refresh] = list(fake.refresh)
    await client.close()
    assert fake.hits["end_session_page"] == 0
    [revocation] = fake.revocations
    assert (revocation.fields["token"], revocation.fields["token_type_hint"]) == (refresh, "refresh_token")
    assert refresh not in fake.refresh
    assert [e["how"] for e in _events(caplog, "token.session_ended")] == ["revoke"]
    _assert_not_logged(caplog, refresh, O2_SECRET, O2_PASSWORD)


async def test_a_logout_that_answers_a_page_is_a_failure(aiohttp_server, aiohttp_client, caplog):
    """A logout URL that answers 200 with an HTML page ended nothing: a warning, never token.session_ended."""
    idp = await start_idp(aiohttp_server)
    _, api_url = await start_api(aiohttp_server, idp)
    page = web.Application()

    async def sign_out_page(request: web.Request) -> web.Response:
        return web.Response(text="<html>Sign out?</html>", content_type="text/html")

    page.router.add_post("/logout", sign_out_page)
    page_server = await aiohttp_server(page)
    mapping = {
        "upstream": {"url": api_url},
        "auth": {
            "provider": "keycloak",
            "token_url": idp.token_url(),
            "logout_url": str(page_server.make_url("/logout")),
            "client_id": "demo-client",
            "username": "demo",
            "password": "demo",
            "revoke_on_shutdown": True,
        },
    }
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    await client.close()
    assert _events(caplog, "token.session_ended") == []
    [failed] = _events(caplog, "token.session_end_failed")
    assert "answered 200 with an HTML page, not 204" in failed["detail"]


PKCE_VERIFIER = "pkce-verifier-" + "x" * 40


async def test_pkce_code_verifier_goes_with_the_code_exchange_only(aiohttp_server, aiohttp_client, caplog, tmp_path):
    """auth.code_verifier_file: sent with the authorization code, never with a refresh or a revocation, never logged."""
    fake = await start_fake(aiohttp_server, _o2_fake(expires_in=2))
    code = fake.add_code(O2_USER)
    verifier_file = tmp_path / "verifier"
    verifier_file.write_text(PKCE_VERIFIER + "\n")
    mapping = _o2_mapping(fake, grant_type="authorization_code", code=code, code_verifier_file=str(verifier_file))
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200

    async def refreshed() -> bool:
        assert (await client.get("/v1/hello")).status == 200
        return len(fake.grants("refresh_token")) >= 1

    await _eventually(refreshed, "a scheduled refresh")
    assert fake.seen[0].fields["code_verifier"] == PKCE_VERIFIER
    assert all("code_verifier" not in s.fields for s in fake.seen[1:])
    _assert_not_logged(caplog, PKCE_VERIFIER, code)


def test_code_verifier_is_a_secret_key_checked_like_the_others(tmp_path):
    """code_verifier: from the environment or a _file, hidden from repr and in Config.secrets(); a value in
    auth.extra is moved there; only with authorization_code; RFC 7636's alphabet and length, never quoted."""
    base = {
        "upstream": {"url": "https://api.example"},
        "auth": {"provider": "oauth2", "token_url": "https://idp.example/t"},
    }
    code_auth = {**base["auth"], "grant_type": "authorization_code", "code": "c0de"}
    config = config_from_mapping({**base, "auth": {**code_auth, "extra": {"code_verifier": PKCE_VERIFIER, "a": 1}}})
    assert config.auth.code_verifier == PKCE_VERIFIER and dict(config.auth.extra) == {"a": 1}
    assert PKCE_VERIFIER not in repr(config) and PKCE_VERIFIER in config.secrets()
    env = {
        "OAUTH_SIDECAR_UPSTREAM_URL": "https://api.example",
        "OAUTH_SIDECAR_AUTH_PROVIDER": "oauth2",
        "OAUTH_SIDECAR_AUTH_TOKEN_URL": "https://idp.example/t",
        "OAUTH_SIDECAR_AUTH_GRANT_TYPE": "authorization_code",
        "OAUTH_SIDECAR_AUTH_CODE": "c0de",
        "OAUTH_SIDECAR_AUTH_CODE_VERIFIER": PKCE_VERIFIER,
    }
    assert load_config(None, env=env).auth.code_verifier == PKCE_VERIFIER
    with pytest.raises(ConfigError, match="only sent with grant_type authorization_code"):
        config_from_mapping(
            {
                **base,
                "auth": {
                    **base["auth"],
                    "grant_type": "client_credentials",
                    "client_id": "c",
                    "client_secret": "s",
                    "code_verifier": PKCE_VERIFIER,
                },
            }
        )
    with pytest.raises(ConfigError, match="43 to 128 characters") as info:
        config_from_mapping({**base, "auth": {**code_auth, "code_verifier": "short-secret-verifier"}})
    assert "short-secret-verifier" not in str(info.value)


async def test_a_token_url_that_answers_404_names_the_url_not_the_password(aiohttp_server, aiohttp_client, caplog):
    """A token_url with a typo (404 HTML): the 503 and the log name the URL; no "check the password", no
    minutes-long credential backoff: it is retried like any transient failure."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    nothing_there = await aiohttp_server(web.Application())  # aiohttp's own "404: Not Found"
    wrong = str(nothing_there.make_url("/oauth/tokne"))
    mapping = _o2_mapping(fake, grant_type="password", username=O2_USER, password=O2_PASSWORD)
    mapping["auth"]["token_url"] = wrong
    client = await _proxy(aiohttp_client, mapping, transient_backoff=lambda attempt, rand, retry_after=None: 30.0)
    status, body = await _json(client, "/v1/hello")
    assert status == 503
    assert wrong in body["detail"] and "auth.token_url" in body["detail"]
    assert "password" not in body["detail"] and "credentials" not in body["detail"]
    assert _events(caplog, "token.login_rejected") == []
    assert (await _status(client))["last_error"]["reason"] == "not_a_token_endpoint"
    _assert_not_logged(caplog, O2_PASSWORD, O2_SECRET)


async def test_a_wrong_client_secret_hint_names_the_client_keys_only(aiohttp_server, aiohttp_client, caplog):
    """client_credentials with a wrong secret: the hint names auth.client_id and auth.client_secret, not a
    username or password the grant does not use."""
    fake = await start_fake(aiohttp_server, _o2_fake())
    mapping = _o2_mapping(fake, grant_type="client_credentials")
    mapping["auth"]["client_secret"] = "not-the-secret-5521"
    client = await _proxy(aiohttp_client, mapping, rejected_backoff=lambda attempt, rand: 60.0)
    status, body = await _json(client, "/v1/hello")
    assert status == 503
    assert "(auth.client_id, auth.client_secret)" in body["detail"]
    [rejected] = _events(caplog, "token.login_rejected")
    assert rejected["hint"] == "check auth.client_id and auth.client_secret"
    assert "username" not in body["detail"] + rejected["hint"] and "password" not in rejected["hint"]
    _assert_not_logged(caplog, "not-the-secret-5521")
