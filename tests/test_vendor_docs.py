"""What each vendor's own document says, checked against the sidecar and against the fakes that stand in for it.

The documents, cited by title and section, with the words quoted (never by line: copies differ):

* we360.ai, "OAuth for Direct API Access": Overview, Login API, Refresh Token API, Use the bearer token,
  Token lifecycle and best practices;
* WebCommander, "WebCommander API Authentication": Authentication Endpoint, Parameter Descriptions, Example
  Request, API Response, Using the Access Token;
* OLI Systems, "Bearer Token": User Authentication (Request Body, the 200 sample, Response description), Refreshing;
* a generic OAuth 2.0 provider's guide ("OAuth 2.0 is the industry-standard protocol for authorization"): its
  Options 1 to 5, one per grant type;
* Keycloak's OIDC endpoints, for what the we360 and OLI pages leave out (both are Keycloak realms).

Where a test answers with a document's sample response, it sends it verbatim (``Fault(200, sample)``), so the
sidecar is checked against the vendor's shape, not against the shape our fakes happen to produce.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import config_from_mapping
from proxy.demo import DemoIdP, Fault
from tests.fakes.servers import start_app, start_idp, start_proxy
from tests.fakes.vendors import JSON, FakeOAuth2, FakeWebCommander, start_fake

NO_401_INTERVAL = {"rejection_renewal_interval_s": 0.0}
WAIT_S = 8.0

# we360, the "Sample response" of both the Login API and the Refresh Token API: no expires_in, no refresh_expires_in.
WE360_SAMPLE = {
    "access_token": "eyJhbG...8qA1Klw",
    "refresh_token": "eyJhbGciOiJIUzI1NiIsInR...x78q-gRk2-lLHV53L0",
    "token_type": "Bearer",
    "not-before-policy": 0,
    "session_state": "bb62faa8-1b33-4d8e-966b-88120e39670a",
    "scope": "email offline_access profile",
}
# OLI, User Authentication, the 200 sample: lower-case "bearer", a non-zero not-before-policy.
OLI_SAMPLE = {
    "access_token": "eyJhbGciOiJ...",
    "expires_in": 300,
    "refresh_expires_in": 1800,
    "refresh_token": "eyJhbGciOiJI...",
    "token_type": "bearer",
    "not-before-policy": 1588002927,
    "session_state": "b0451c5f-5233-4404-b601-558253efe3a6",
    "scope": "oli_user_role",
}


class Upstream:
    """An API that records the headers each request arrived with; ``reject`` = how many 401s to answer first."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.reject = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        if self.reject:
            self.reject -= 1
            return web.Response(status=401)
        return web.json_response({"ok": True})


async def _upstream(aiohttp_server: Any) -> tuple[Upstream, str]:
    upstream = Upstream()
    return upstream, await start_app(aiohttp_server, upstream.app())


async def _proxy(aiohttp_client: Any, mapping: dict[str, Any]) -> Any:
    config = config_from_mapping({"listen": {"port": 0}, **mapping}, source="test")
    return await start_proxy(aiohttp_client, config, **NO_401_INTERVAL)


async def _token_status(client: Any) -> dict[str, Any]:
    """/-/status's token, once the first login is done."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        body = await (await client.get("/-/status")).json()
        if body.get("token"):
            return body["token"]
        assert asyncio.get_running_loop().time() < deadline, f"no token: {body}"
        await asyncio.sleep(0.05)


# --- we360 ---------------------------------------------------------------------------------------


async def test_we360_sample_exchange_as_documented(aiohttp_server, aiohttp_client):
    """we360: the Login and Refresh requests are the documented curl calls; the sample answer lives 10 hours.

    Login API, cURL example: Content-Type application/x-www-form-urlencoded; client_id, username, password,
    grant_type=password (and no secret: its Request parameters table has none). Overview: "The `access_token`
    is valid for 10 hours." and the Login API's sample response has no expires_in (its token is not a readable
    JWT either). Use the bearer token: "Authorization: Bearer ${access_token}". Refresh Token API, cURL
    example: client_id, refresh_token, grant_type=refresh_token; Token lifecycle and best practices: "Always
    store the newest `access_token` and `refresh_token`."
    """
    idp = await start_idp(aiohttp_server, realm="ind-prod", users={}, clients={"cust-4711": None})
    upstream, api_url = await _upstream(aiohttp_server)
    refreshed = {**WE360_SAMPLE, "access_token": "eyJhbG...second", "refresh_token": "eyJhbGciOi...second"}
    idp.fail_next(Fault(200, WE360_SAMPLE), Fault(200, refreshed))
    client = await _proxy(
        aiohttp_client,
        {
            "upstream": {"url": api_url},
            "auth": {"token_url": idp.token_url(), "client_id": "cust-4711", "username": "ops@example.com"}
            | {"password": "we360-pass"},
        },
    )
    assert (await client.get("/v1/some-endpoint")).status == 200
    assert idp.hits["bad_content_type"] == 0  # the Keycloak-like fake answers 415 to anything but a form
    assert idp.requests == [
        {"client_id": "cust-4711", "username": "ops@example.com", "password": "we360-pass", "grant_type": "password"}
    ]
    assert upstream.seen[-1]["authorization"] == "Bearer eyJhbG...8qA1Klw"
    assert 35990 < (await _token_status(client))["expires_in_s"] <= 36000

    upstream.reject = 1  # the API refuses the token: the sidecar refreshes with the sample's refresh_token
    assert (await client.get("/v1/some-endpoint")).status == 200
    assert idp.requests[-1] == {
        "client_id": "cust-4711",
        "refresh_token": WE360_SAMPLE["refresh_token"],
        "grant_type": "refresh_token",
    }
    assert upstream.seen[-1]["authorization"] == "Bearer eyJhbG...second"


async def test_we360_session_ends_at_the_realm_logout_with_the_customer_id(aiohttp_server, aiohttp_client):
    """we360 with revoke_on_shutdown: Keycloak's logout beside the token endpoint, with client authentication.

    we360, Token lifecycle and best practices: "Revoke the session on logout if your application supports it."
    Keycloak's OIDC logout endpoint, beside the token endpoint: a form-encoded POST with client authentication
    and the `refresh_token`, answered 204.
    """

    class LogoutRecordingIdP(DemoIdP):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.logouts: list[tuple[str, dict[str, str]]] = []

        async def logout_endpoint(self, request: web.Request) -> web.Response:
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
            self.logouts.append((request.content_type, form))
            return await super().logout_endpoint(request)

    idp = LogoutRecordingIdP(realm="ind-prod", users={"ops@example.com": "pw"}, clients={"cust-4711": None})
    idp.base_url = await start_app(aiohttp_server, idp.app())
    _, api_url = await _upstream(aiohttp_server)
    mapping = {
        "upstream": {"url": api_url},
        "auth": {"token_url": idp.token_url(), "client_id": "cust-4711", "username": "ops@example.com"}
        | {"password": "pw", "revoke_on_shutdown": True},
    }
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/x")).status == 200
    [refresh_token] = idp.refresh
    await client.close()
    assert idp.logouts == [
        ("application/x-www-form-urlencoded", {"refresh_token": refresh_token, "client_id": "cust-4711"})
    ]


# --- OLI ----------------------------------------------------------------------------------------


async def test_oli_sample_response_is_read_as_documented(aiohttp_server, aiohttp_client):
    """OLI: the sample answer (lower-case "bearer") gives a Bearer header and a 300 s token.

    User Authentication, Request Body (form-encoded): username, password, grant_type=password,
    client_id=apiclient. Its 200 sample: "expires_in": 300, "token_type": "bearer"; the introduction: "This
    token is then passed in the http headers" (the page is titled "Bearer Token"). Refreshing, Request Body:
    refresh_token, grant_type, client_id.
    """
    idp = await start_idp(aiohttp_server, realm="api", users={}, clients={"apiclient": None})
    upstream, api_url = await _upstream(aiohttp_server)
    idp.fail_next(Fault(200, OLI_SAMPLE), Fault(200, {**OLI_SAMPLE, "access_token": "eyJhbGciOiJ...second"}))
    auth = {"provider": "oli", "token_url": idp.token_url(), "username": "oli-user", "password": "oli-pass"}
    client = await _proxy(aiohttp_client, {"upstream": {"url": api_url}, "auth": auth})
    assert (await client.get("/v1/x")).status == 200
    assert idp.requests == [
        {"grant_type": "password", "username": "oli-user", "password": "oli-pass", "client_id": "apiclient"}
    ]
    assert upstream.seen[-1]["authorization"] == "Bearer eyJhbGciOiJ..."
    token = await _token_status(client)
    assert 290 < token["expires_in_s"] <= 300

    upstream.reject = 1
    assert (await client.get("/v1/x")).status == 200
    assert idp.requests[-1] == {
        "grant_type": "refresh_token",
        "refresh_token": OLI_SAMPLE["refresh_token"],
        "client_id": "apiclient",
    }
    assert upstream.seen[-1]["authorization"] == "Bearer eyJhbGciOiJ...second"


@pytest.mark.parametrize(
    "field",
    [
        "refresh_expires_in",  # User Authentication, the 200 sample
        "refresh_token_expires_in",  # User Authentication, Response description (the field table)
    ],
)
async def test_oli_refresh_token_lifetime_under_either_documented_name(aiohttp_server, aiohttp_client, field):
    """OLI names the refresh token's lifetime two ways; under either, a refresh token dying first is honoured.

    User Authentication, the 200 sample: `"refresh_expires_in": 1800`; its Response description (HTML entities
    decoded): `refresh_token_expires_in | number | refresh token expiration time in seconds`. With a refresh token that
    dies after 120 s and an access token of 300 s, the renewal must be due before the refresh token dies.
    """
    idp = await start_idp(aiohttp_server, realm="api", users={}, clients={"apiclient": None})
    _, api_url = await _upstream(aiohttp_server)
    sample = {k: v for k, v in OLI_SAMPLE.items() if k != "refresh_expires_in"} | {field: 120}
    idp.fail_next(Fault(200, sample))
    auth = {"provider": "oli", "token_url": idp.token_url(), "username": "oli-user", "password": "oli-pass"}
    client = await _proxy(aiohttp_client, {"upstream": {"url": api_url}, "auth": auth})
    token = await _token_status(client)
    assert 290 < token["expires_in_s"] <= 300
    assert token["has_refresh_token"] is True
    assert token["refresh_in_s"] < 115  # not 240 (a minute before the access token's expiry)


# --- WebCommander -------------------------------------------------------------------------------


async def test_webcommander_example_request_and_header(aiohttp_server, aiohttp_client):
    """WebCommander: with the example's credentials, the request is the example request, byte for byte in JSON.

    Authentication Endpoint: "Content-Type: application/json"; Example Request, whose auth_string decodes to
    "newwc7@mywebcommander.com:newwc7@mywebcommander.com" (Parameter Descriptions: "A base64-encoded
    authentication string containing your credentials in the format username:password"). API Response: the
    response (no token_type); Using the Access Token: the example header "access_token: ACCESS_TOKEN".
    """
    user = "newwc7@mywebcommander.com"
    fake = FakeWebCommander(client_secret="14e72a77d9125429b0c514010ddb0e46", users={user: user})
    await start_fake(aiohttp_server, fake)
    auth = {
        "provider": "webcommander",
        "client_id": "f6681a45ad483e3c0a37016561d5b8be",
        "client_secret": "14e72a77d9125429b0c514010ddb0e46",
        "username": user,
        "password": user,
        "redirect_uri": "https://api.webcommander.com/oauth-callback",
    }
    client = await _proxy(aiohttp_client, {"upstream": {"url": fake.base_url}, "auth": auth})
    assert (await client.get("/api/v4/product")).status == 200
    [login] = fake.seen
    assert login.content_type == JSON
    assert login.raw_json == {
        "grant_type": "client_credentials",
        "auth_string": "bmV3d2M3QG15d2ViY29tbWFuZGVyLmNvbTpuZXd3YzdAbXl3ZWJjb21tYW5kZXIuY29t",
        "redirect_uri": "https://api.webcommander.com/oauth-callback",
        "client_id": "f6681a45ad483e3c0a37016561d5b8be",
        "client_secret": "14e72a77d9125429b0c514010ddb0e46",
    }
    arrived = {k.lower(): v for k, v in fake.api_calls[-1].headers.items()}
    assert arrived["access_token"] == fake.handed_out[0]
    assert 3590 < (await _token_status(client))["expires_in_s"] <= 3600  # API Response: "expires_in": 3600


# --- generic OAuth 2.0 ---------------------------------------------------------------------------


async def test_oauth2_client_credentials_comes_with_a_refresh_token_that_is_used(aiohttp_server, aiohttp_client):
    """Generic OAuth 2.0: client_credentials also returns a refresh token, and renewal posts it back as documented.

    Option 5 (Refresh Token): "For all work flows, except implicit (option 2), the access token will come with
    a refresh token. When the access token expires, post the refresh token back to the /token endpoint."
    Option 4 (Application Login), its "ex body"; Option 5's "ex body": grant_type, client_id, client_secret,
    refresh_token. (RFC 6749 §4.4.3 says a refresh token SHOULD NOT be issued here; this vendor issues one.)
    """
    fake = await start_fake(aiohttp_server, FakeOAuth2(clients={"BA779C49-client": "4AD3CE00-secret"}))
    mapping = {
        "upstream": {"url": fake.base_url},
        "auth": {"provider": "oauth2", "token_url": fake.token_url, "grant_type": "client_credentials"}
        | {"client_id": "BA779C49-client", "client_secret": "4AD3CE00-secret", "body": "json"},
    }
    client = await _proxy(aiohttp_client, mapping)
    assert (await client.get("/v1/hello")).status == 200
    assert fake.seen[0].raw_json == {
        "grant_type": "client_credentials",
        "client_id": "BA779C49-client",
        "client_secret": "4AD3CE00-secret",
    }
    assert (await _token_status(client))["has_refresh_token"] is True

    fake.revoke_all_access()  # the API answers 401: the sidecar renews with the refresh token, not a new login
    assert (await client.get("/v1/hello")).status == 200
    assert [s.grant for s in fake.seen] == ["client_credentials", "refresh_token"]
    assert fake.seen[1].raw_json == {
        "grant_type": "refresh_token",
        "refresh_token": fake.handed_out[1],
        "client_id": "BA779C49-client",
        "client_secret": "4AD3CE00-secret",
    }


# --- the fakes answer in the documents' shapes ---------------------------------------------------


async def test_fakes_answer_with_the_documented_fields(aiohttp_server):
    """Each fake's successful token response has exactly the fields of its vendor's sample response.

    we360's Login API sample response (no expires_in), OLI's User Authentication 200 sample, WebCommander's
    API Response (access_token, refresh_token, expires_in: no token_type), the generic guide's Option 5
    ("For all work flows, except implicit", client_credentials included).
    """
    we360 = await start_idp(aiohttp_server, realm="ind-prod", users={"u": "p"}, send_expires_in=False)
    oli = await start_idp(aiohttp_server, realm="api", users={"u": "p"}, clients={"apiclient": None})
    wc = await start_fake(aiohttp_server, FakeWebCommander(users={"u": "p"}))
    o2 = await start_fake(aiohttp_server, FakeOAuth2(clients={"c": "s"}))
    password = {"grant_type": "password", "username": "u", "password": "p"}
    async with aiohttp.ClientSession() as session:

        async def fields(url: str, **kwargs: Any) -> set[str]:
            async with session.post(url, **kwargs) as resp:
                assert resp.status == 200, await resp.text()
                return set(await resp.json())

        assert await fields(we360.token_url(), data={**password, "client_id": "demo-client"}) == set(WE360_SAMPLE)
        assert await fields(oli.token_url(), data={**password, "client_id": "apiclient"}) == set(OLI_SAMPLE)
        wc_body = {"grant_type": "client_credentials", "auth_string": "dTpw", "redirect_uri": wc.redirect_uri}
        wc_body |= {"client_id": wc.client_id, "client_secret": wc.client_secret}
        assert await fields(wc.token_url, json=wc_body) == {"access_token", "refresh_token", "expires_in"}
        o2_body = {"grant_type": "client_credentials", "client_id": "c", "client_secret": "s"}
        assert "refresh_token" in await fields(o2.token_url, json=o2_body)
