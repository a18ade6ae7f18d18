"""Client authentication by signed assertion (private_key_jwt, client_secret_jwt): proxy/client_auth.py.

The provider is tests/fakes/keyauth_idp.py, which verifies each assertion's signature with the client's
public key (or secret), its claims, and refuses a reused jti. Keys are made fresh per test session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy import cli
from proxy.client_auth import ASSERTION_LIFETIME_S, ASSERTION_TYPE
from proxy.config import AuthConfig, InjectConfig, config_from_mapping
from proxy.errors import ConfigError
from proxy.idp import IdentityProvider
from tests.fakes.keyauth_idp import Client, KeyAuthAPI, KeyAuthIdP, client_credentials_mapping
from tests.fakes.servers import start_app, start_proxy

CLIENT_ID = "svc-reports"
# 48 bytes: client_secret_jwt needs at least 32 (HS256, RFC 7518 §3.2).
HS_SECRET = "hs-secret-0123456789abcdef0123456789abcdef-never-logged"


def _write_key(folder: Path, name: str, key: Any, password: bytes | None = None) -> tuple[str, str]:
    """Write ``key`` as PKCS#8 PEM; returns (path, the PEM text) so tests can check it never leaks."""
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path = folder / name
    path.write_bytes(pem)
    return str(path), pem.decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An RSA 2048 key, an EC P-256 key, a second RSA key (the wrong one), and odd ones for config errors."""
    folder = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    out: dict[str, Any] = {"rsa": rsa_key, "ec": ec_key, "other": other}
    out["rsa_file"], out["rsa_pem"] = _write_key(folder, "rsa.pem", rsa_key)
    out["ec_file"], _ = _write_key(folder, "ec.pem", ec_key)
    out["encrypted_file"], _ = _write_key(folder, "enc.pem", rsa_key, password=b"pw")
    out["p384_file"], _ = _write_key(folder, "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    out["rsa1024_file"], _ = _write_key(folder, "rsa1024.pem", rsa.generate_private_key(65537, 1024))
    garbage = folder / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWxvb2tpbmctZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n")
    out["garbage_file"] = str(garbage)
    return out


async def _start(aiohttp_server: Any, idp: KeyAuthIdP) -> str:
    idp.base_url = await start_app(aiohttp_server, idp.app())
    return await start_app(aiohttp_server, KeyAuthAPI(idp).app())


def _config(idp: KeyAuthIdP, api_url: str, **auth: Any) -> Any:
    mapping = client_credentials_mapping(
        {"token_url": idp.token_url(), "revoke_url": idp.revoke_url(), "client_id": CLIENT_ID, **auth}, {"url": api_url}
    )
    return config_from_mapping({"listen": {"port": 0}, **mapping}, source="test")


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)


# (client_auth, client_key_alg given, the key's name in `keys`, the algorithm the provider registered)
ALGORITHMS = [
    ("private_key_jwt", "", "rsa", "RS256"),  # the default for an RSA key
    ("private_key_jwt", "PS256", "rsa", "PS256"),
    ("private_key_jwt", "", "ec", "ES256"),  # the default for a P-256 key
    ("client_secret_jwt", "", None, "HS256"),
]


@pytest.mark.parametrize("body", ["form", "json"])
@pytest.mark.parametrize(("method", "alg", "key", "registered"), ALGORITHMS, ids=[a[3] for a in ALGORITHMS])
async def test_each_algorithm_gets_a_token_through_the_proxy(
    aiohttp_server, aiohttp_client, keys, caplog, method, alg, key, registered, body
):
    """Each algorithm, in a form or a JSON body: the provider verifies the assertion, the API gets the token."""
    verify_with = HS_SECRET.encode() if key is None else keys[key].public_key()
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, method, key=verify_with, algorithm=registered))
    api_url = await _start(aiohttp_server, idp)
    auth: dict[str, Any] = {"client_auth": method, "body": body, "client_key_id": "key-2026"}
    if key is None:
        auth["client_secret"] = HS_SECRET
    else:
        auth["client_key_file"] = keys[f"{key}_file"]
    if alg:
        auth["client_key_alg"] = alg
    client = await start_proxy(aiohttp_client, _config(idp, api_url, **auth))

    resp = await client.get("/v1/report")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["path"] == "/v1/report"
    assert idp.refusals == []
    (sent,) = idp.assertions
    assert sent["header"]["alg"] == registered
    assert sent["header"]["kid"] == "key-2026"
    claims = sent["claims"]
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == idp.token_url()
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME_S
    assert len(claims["jti"]) >= 22  # 128 bits or more, base64url
    (request,) = idp.requests
    assert request["client_assertion_type"] == ASSERTION_TYPE
    assert request["client_id"] == CLIENT_ID
    assert "client_secret" not in request  # client_secret_jwt signs with it, never sends it
    await client.close()
    assert request["client_assertion"] not in _logged(caplog)
    assert HS_SECRET not in _logged(caplog)


async def test_every_token_request_gets_a_fresh_assertion(aiohttp_server, aiohttp_client, keys, caplog):
    """Login, refresh and revocation each carry their own assertion (distinct jti), all addressed to the token
    endpoint; the provider refuses none of them as a replay."""
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, "private_key_jwt", key=keys["rsa"].public_key(), algorithm="RS256"))
    api_url = await _start(aiohttp_server, idp)
    config = _config(
        idp, api_url, client_auth="private_key_jwt", client_key_file=keys["rsa_file"], revoke_on_shutdown=True
    )
    client = await start_proxy(aiohttp_client, config, rejection_renewal_interval_s=0.0)
    assert (await client.get("/a")).status == 200
    idp.access_tokens.clear()  # the API now answers 401: the proxy refreshes, with a new assertion
    assert (await client.get("/b")).status == 200
    await client.close()  # revoke_on_shutdown: the revocation request is authenticated too

    assert [r.get("grant_type", "revoke") for r in idp.requests] == ["client_credentials", "refresh_token", "revoke"]
    assert idp.refusals == []
    assert idp.hits["revoke"] == 1
    jtis = [a["claims"]["jti"] for a in idp.assertions]
    assert len(jtis) == 3 and len(set(jtis)) == 3
    assert {a["claims"]["aud"] for a in idp.assertions} == {idp.token_url()}
    text = _logged(caplog)
    assert not any(r["client_assertion"] in text for r in idp.requests)
    assert keys["rsa_pem"].splitlines()[1] not in text


async def test_two_logins_never_share_a_jti_and_a_replay_is_refused(aiohttp_server, keys):
    """Two logins carry different jti values; the same assertion sent again is refused (invalid_client): the
    fake really checks replay, so a proxy reusing an assertion would fail here."""
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, "private_key_jwt", key=keys["ec"].public_key(), algorithm="ES256"))
    await _start(aiohttp_server, idp)
    auth = _config(idp, "http://127.0.0.1:1", client_auth="private_key_jwt", client_key_file=keys["ec_file"]).auth
    async with aiohttp.ClientSession() as session:
        provider = IdentityProvider(session, auth, InjectConfig())
        first, second = await provider.login(), await provider.login()
        assert first.access_token != second.access_token
        jtis = [a["claims"]["jti"] for a in idp.assertions]
        assert len(jtis) == 2 and jtis[0] != jtis[1]

        replayed = dict(idp.requests[0])
        async with session.post(idp.token_url(), data=replayed) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"
    assert idp.refusals == ["jti already used (replay)"]


def test_each_assertion_is_made_at_its_request(keys):
    """iat, nbf and exp come from the wall clock when each request is made, never from a cached assertion:
    a refresh an hour after the login carries an assertion of that hour."""
    from proxy.client_auth import ClientAuthenticator

    now = [1_700_000_000.0]
    auth = config_from_mapping(_auth(client_auth="private_key_jwt", client_key_file=keys["ec_file"])).auth
    authenticator = ClientAuthenticator(auth, clock=lambda: now[0])
    made = []
    for _ in range(2):
        made.append(authenticator.apply({}, {}, "https://idp.example/token"))
        now[0] += 3600
    options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
    first, second = (
        jwt.decode(
            m, keys["ec"].public_key(), algorithms=["ES256"], audience="https://idp.example/token", options=options
        )
        for m in made
    )
    assert (first["iat"], first["exp"]) == (1_700_000_000, 1_700_000_060)
    assert (second["iat"], second["nbf"], second["exp"]) == (1_700_003_600, 1_700_003_600, 1_700_003_660)
    assert first["jti"] != second["jti"]


def test_a_key_file_gone_after_the_config_was_read_is_a_config_error(keys, tmp_path):
    """The key is loaded again when the proxy starts; gone by then, it is a ConfigError naming the key."""
    from proxy.client_auth import ClientAuthenticator

    path = tmp_path / "key.pem"
    path.write_bytes(Path(keys["rsa_file"]).read_bytes())
    auth = config_from_mapping(_auth(client_auth="private_key_jwt", client_key_file=str(path))).auth
    path.unlink()
    with pytest.raises(ConfigError) as caught:
        ClientAuthenticator(auth)
    assert caught.value.key == "auth.client_key_file" and "no such file" in caught.value.problem


async def test_a_key_the_provider_does_not_know_is_rejected_naming_the_key_file(
    aiohttp_server, aiohttp_client, keys, caplog
):
    """A key the provider does not hold: its invalid_client puts the proxy in the rejected state, and the
    503 and /-/ready name auth.client_key_file (and client_key_id), never the key."""
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, "private_key_jwt", key=keys["other"].public_key(), algorithm="RS256"))
    api_url = await _start(aiohttp_server, idp)
    config = _config(idp, api_url, client_auth="private_key_jwt", client_key_file=keys["rsa_file"], client_key_id="k1")
    client = await start_proxy(aiohttp_client, config)

    resp = await client.get("/v1/report")
    assert resp.status == 503
    body = await resp.json()
    assert "invalid_client" in body["detail"]
    assert "auth.client_key_file" in body["detail"] and "auth.client_key_id" in body["detail"]
    ready = await client.get("/-/ready")
    assert ready.status == 503
    assert (await ready.json())["state"] == "rejected"
    status = await (await client.get("/-/status")).json()
    assert status["last_error"]["reason"] == "invalid_client"
    assert "InvalidSignatureError" in idp.refusals[0]
    rejected = [r for r in caplog.records if r.getMessage() == "token.login_rejected"]
    assert rejected and "auth.client_key_file" in rejected[0].fields["hint"]  # type: ignore[attr-defined]
    await client.close()
    assert keys["rsa_pem"].splitlines()[1] not in _logged(caplog)


async def test_client_secret_jwt_with_the_wrong_secret_is_rejected_naming_the_secret(aiohttp_server, aiohttp_client):
    """client_secret_jwt signed with a secret the provider does not have: 503 naming auth.client_secret."""
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, "client_secret_jwt", key=b"x" * 40, algorithm="HS256"))
    api_url = await _start(aiohttp_server, idp)
    client = await start_proxy(
        aiohttp_client, _config(idp, api_url, client_auth="client_secret_jwt", client_secret=HS_SECRET)
    )
    resp = await client.get("/v1/report")
    assert resp.status == 503
    detail = (await resp.json())["detail"]
    assert "invalid_client" in detail and "auth.client_secret" in detail
    assert HS_SECRET not in detail


# --- configuration errors ------------------------------------------------------------------------


def _auth(**keys: Any) -> dict[str, Any]:
    return client_credentials_mapping({"client_id": CLIENT_ID, **keys})


@pytest.mark.parametrize(
    ("settings", "key", "words"),
    [
        ({"client_auth": "private_key_jwt"}, "auth.client_key_file", "required for client_auth private_key_jwt"),
        ({"client_auth": "private_key_jwt", "client_key_file": "/nonexistent/key.pem"}, "auth.client_key_file",
         "no such file: '/nonexistent/key.pem'"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{dir}"}, "auth.client_key_file",
         "is not a regular file"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{fifo}"}, "auth.client_key_file",
         "is not a regular file"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{garbage_file}"}, "auth.client_key_file",
         "holds no PEM private key that can be loaded"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{encrypted_file}"}, "auth.client_key_file",
         "holds an encrypted private key"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{rsa1024_file}"}, "auth.client_key_file",
         "1024-bit RSA key; at least 2048 bits"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{p384_file}"}, "auth.client_key_file",
         "curve secp384r1; ES256 needs P-256"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{rsa_file}", "client_key_alg": "ES256"},
         "auth.client_key_alg", "'ES256' does not fit an RSA key (use RS256 or PS256)"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{ec_file}", "client_key_alg": "RS256"},
         "auth.client_key_alg", "'RS256' does not fit an EC P-256 key (use ES256)"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{rsa_file}", "client_key_alg": "none"},
         "auth.client_key_alg", "'none' does not fit an RSA key"),
        ({"client_auth": "client_secret_jwt"}, "auth.client_secret", "required for grant_type client_credentials"),
        ({"client_auth": "client_secret_jwt", "client_secret": "short"}, "auth.client_secret", "at least 32 bytes"),
        ({"client_auth": "client_secret_jwt", "client_secret": HS_SECRET, "client_key_alg": "RS256"},
         "auth.client_key_alg", "client_secret_jwt signs HS256"),
        ({"client_auth": "body", "client_secret": "s3cret-xyz", "client_key_file": "{rsa_file}"},
         "auth.client_key_file", "only used with client_auth private_key_jwt or with auth.client_cert_file"),
        ({"client_auth": "basic", "client_secret": "s3cret-xyz", "client_key_id": "k1"}, "auth.client_key_id",
         "only used with client_auth private_key_jwt or client_secret_jwt"),
        ({"client_auth": "private_key_jwt", "client_key_file": "{rsa_file}", "client_id": "", "grant_type": "password",
          "username": "u", "password": "p"}, "auth.client_id",
         "required for client_auth private_key_jwt"),
        ({"client_auth": "signed_jwt"}, "auth.client_auth", "must be one of body, basic, client_secret_jwt"),
        ({"client_auth": "body", "client_secret": "s3cret-xyz", "assertion_audience": "https://t.example/"},
         "auth.assertion_audience", "only used with client_auth private_key_jwt or client_secret_jwt"),
        ({"client_auth": "client_secret_jwt", "client_secret": HS_SECRET, "assertion_audience": "a b"},
         "auth.assertion_audience", "without spaces"),
    ],
    ids=[
        "pkjwt-no-key", "missing-file", "directory", "fifo", "garbage", "encrypted", "rsa-1024", "p-384", "alg-es-rsa",
        "alg-rs-ec", "alg-none", "csjwt-no-secret", "csjwt-short-secret", "csjwt-alg", "key-unused",
        "kid-unused", "no-client-id", "unknown-method", "aud-unused", "aud-spaces",
    ],
)  # fmt: skip
def test_key_configuration_errors_name_the_key_and_never_the_content(keys, tmp_path, settings, key, words):
    """Each bad key setting is one ConfigError naming the key; a key file's content is never quoted."""
    os.mkfifo(tmp_path / "fifo")  # opening it would block until a writer came: it must never be opened
    files = {name: value for name, value in keys.items() if name.endswith("_file")}
    files |= {"dir": str(tmp_path), "fifo": str(tmp_path / "fifo")}
    resolved = {k: v.format(**files) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(_auth(**resolved), source="test.toml")
    assert caught.value.key == key
    assert words in caught.value.problem
    message = str(caught.value)
    assert "c2VjcmV0" not in message and "BEGIN" not in message
    assert keys["rsa_pem"].splitlines()[1] not in message


def test_client_credentials_by_key_needs_no_client_secret(keys):
    """client_credentials with private_key_jwt: no client_secret required, and none is sent."""
    config = config_from_mapping(_auth(client_auth="private_key_jwt", client_key_file=keys["rsa_file"]))
    assert isinstance(config.auth, AuthConfig) and config.auth.client_secret == ""
    assert config.auth.client_key_alg == ""  # the default is derived when signing: RS256 here


def test_cli_exits_2_for_a_key_that_does_not_load(keys, tmp_path, capsys):
    """`oauth-sidecar --check` with a garbage key file: exit 2, one line naming auth.client_key_file."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example"\n[auth]\nprovider = "oauth2"\ntoken_url = "https://idp.example/t"\n'
        f'grant_type = "client_credentials"\nclient_id = "c"\nclient_auth = "private_key_jwt"\n'
        f'client_key_file = "{keys["garbage_file"]}"\n'
    )
    assert cli.main(["--check", "--config", str(path)], env={}) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "auth.client_key_file" in err and "holds no PEM private key" in err
    assert "c2VjcmV0" not in err


def test_environment_names_the_key_file(keys):
    """OAUTH_SIDECAR_AUTH_CLIENT_KEY_FILE sets the path (a path key, not a secret value)."""
    env = {
        "OAUTH_SIDECAR_UPSTREAM_URL": "https://api.example",
        "OAUTH_SIDECAR_AUTH_PROVIDER": "oauth2",
        "OAUTH_SIDECAR_AUTH_TOKEN_URL": "https://idp.example/t",
        "OAUTH_SIDECAR_AUTH_GRANT_TYPE": "client_credentials",
        "OAUTH_SIDECAR_AUTH_CLIENT_ID": "c",
        "OAUTH_SIDECAR_AUTH_CLIENT_AUTH": "private_key_jwt",
        "OAUTH_SIDECAR_AUTH_CLIENT_KEY_FILE": keys["ec_file"],
    }
    from proxy.config import load_config

    assert load_config(None, env).auth.client_key_file == keys["ec_file"]


def test_signed_assertion_is_verifiable_and_short_lived(keys):
    """Unit view of one assertion: RS256 over the documented claims, a 256-bit jti, nothing else sensitive."""
    from proxy.client_auth import ClientAuthenticator

    auth = config_from_mapping(_auth(client_auth="private_key_jwt", client_key_file=keys["rsa_file"])).auth
    authenticator = ClientAuthenticator(auth, clock=lambda: 1_700_000_000.0)
    payload: dict[str, Any] = {}
    headers: dict[str, str] = {}
    made = authenticator.apply(payload, headers, "https://idp.example/token")
    assert payload["client_assertion"] == made and headers == {}
    claims = jwt.decode(
        made,
        keys["rsa"].public_key(),
        algorithms=["RS256"],
        audience="https://idp.example/token",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims == {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": "https://idp.example/token",
        "jti": claims["jti"],
        "iat": 1_700_000_000,
        "nbf": 1_700_000_000,
        "exp": 1_700_000_060,
    }
    assert len(claims["jti"]) == 43  # 32 random bytes, base64url
    assert jwt.get_unverified_header(made) == {"alg": "RS256", "typ": "JWT"}


def test_assertion_audience_replaces_the_token_endpoint(keys):
    """auth.assertion_audience (Auth0 wants its tenant URL) becomes the aud claim; nothing else changes."""
    from proxy.client_auth import ClientAuthenticator

    mapping = _auth(client_auth="client_secret_jwt", client_secret=HS_SECRET, assertion_audience="https://t.example/")
    authenticator = ClientAuthenticator(config_from_mapping(mapping).auth)
    payload: dict[str, Any] = {}
    made = authenticator.apply(payload, {}, "https://idp.example/token")
    claims = jwt.decode(made, HS_SECRET.encode(), algorithms=["HS256"], audience="https://t.example/")
    assert claims["iss"] == CLIENT_ID and payload["client_id"] == CLIENT_ID


async def test_an_assertion_echoed_by_the_provider_is_never_shown(aiohttp_server, aiohttp_client, keys, caplog):
    """A provider that quotes the assertion in its refusal: /-/ready, the 503 and the log show it masked."""
    from aiohttp import web

    seen: list[str] = []

    async def token(request: web.Request) -> web.Response:
        assertion = (await request.post())["client_assertion"]
        seen.append(str(assertion))
        return web.json_response({"error": "invalid_client", "error_description": f"bad: {assertion}"}, status=401)

    app = web.Application()
    app.router.add_post("/token", token)
    idp_url = await start_app(aiohttp_server, app)
    idp = KeyAuthIdP(base_url=idp_url)
    config = _config(idp, "http://127.0.0.1:9", client_auth="private_key_jwt", client_key_file=keys["rsa_file"])
    client = await start_proxy(aiohttp_client, config)
    body = await (await client.get("/v1/x")).text()  # waits for the first login, refused
    detail = (await (await client.get("/-/ready")).json())["detail"]
    status = await (await client.get("/-/status")).text()
    await client.close()
    assert seen and "invalid_client" in detail
    for text in (detail, body, status, _logged(caplog)):
        assert not any(assertion in text for assertion in seen)
        assert not any(assertion.split(".")[2] in text for assertion in seen)  # nor its signature
