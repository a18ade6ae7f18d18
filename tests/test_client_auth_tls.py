"""Mutual TLS: tls_client_auth at the token endpoint (RFC 8705 §2) and a client certificate for the upstream.

The token endpoint and the API are real TLS servers on 127.0.0.1 (certificates from a trustme test CA)
that require a client certificate (ssl.CERT_REQUIRED): without one, or with one from another CA, the
handshake fails. The fake token endpoint also checks the certificate's subject against the client's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from proxy.config import config_from_mapping
from proxy.errors import ConfigError
from tests.fakes.keyauth_idp import (
    AlertingTLSServer,
    Client,
    KeyAuthAPI,
    KeyAuthIdP,
    client_credentials_mapping,
    server_context,
)
from tests.fakes.servers import start_proxy

CLIENT_ID = "svc-mtls"
CLIENT_CN = "svc-mtls.clients.example"
API_CN = "svc-mtls.api-clients.example"  # the certificate for the upstream: another one than the IdP's


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A test CA (trusted by the proxy through upstream.ca_file), a client certificate it issued, and a
    client certificate from another CA (which the servers do not trust)."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files: dict[str, Any] = {"ca": ca}
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    files["ca_file"] = str(folder / "ca.pem")
    for name, issuer, cn in (("client", ca, CLIENT_CN), ("stranger", stranger, CLIENT_CN), ("api", ca, API_CN)):
        cert = issuer.issue_cert(cn, common_name=cn)
        cert.cert_chain_pems[0].write_to_path(str(folder / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        cert.private_key_and_cert_chain_pem.write_to_path(str(folder / f"{name}-combined.pem"))
        files[f"{name}_cert"], files[f"{name}_key"] = str(folder / f"{name}.crt"), str(folder / f"{name}.key")
        files[f"{name}_combined"] = str(folder / f"{name}-combined.pem")
    # The client's key, encrypted: alone, and in one PEM with its certificate.
    key = serialization.load_pem_private_key(Path(files["client_key"]).read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (folder / "encrypted.key").write_bytes(encrypted)
    (folder / "encrypted-combined.pem").write_bytes(Path(files["client_cert"]).read_bytes() + encrypted)
    files["encrypted_key"], files["encrypted_combined"] = (
        str(folder / "encrypted.key"),
        str(folder / "encrypted-combined.pem"),
    )
    return files


async def _tls_server(aiohttp_server: Any, app: Any, pki: dict[str, Any], require_client_cert: bool = True) -> str:
    server = await aiohttp_server(app, ssl=server_context(pki["ca"], require_client_cert=require_client_cert))
    return str(server.make_url("")).rstrip("/")


def _config(token_url: str, api_url: str, pki: dict[str, Any], auth: dict[str, Any], **upstream: Any) -> Any:
    mapping = client_credentials_mapping(
        {"token_url": token_url, "client_id": CLIENT_ID, **auth},
        {"url": api_url, "ca_file": pki["ca_file"], **upstream},
    )
    return config_from_mapping({"listen": {"port": 0}, **mapping}, source="test")


async def _stack(aiohttp_server: Any, pki: dict[str, Any], api_cn: str = "") -> tuple[KeyAuthIdP, KeyAuthAPI, str]:
    idp = KeyAuthIdP()
    idp.add(Client(CLIENT_ID, "tls_client_auth", subject_cn=CLIENT_CN))
    idp.base_url = await _tls_server(aiohttp_server, idp.app(), pki)
    api = KeyAuthAPI(idp, subject_cn=api_cn)
    api_url = await _tls_server(aiohttp_server, api.app(), pki, require_client_cert=bool(api_cn))
    return idp, api, api_url


@pytest.mark.parametrize("combined", [False, True], ids=["cert+key", "combined-pem"])
async def test_tls_client_auth_gets_a_token_with_the_certificate(aiohttp_server, aiohttp_client, pki, combined):
    """tls_client_auth: the certificate is presented to the token endpoint, client_id goes in the body, no
    secret anywhere; the token then works upstream. A PEM holding both certificate and key works alone."""
    idp, api, api_url = await _stack(aiohttp_server, pki)
    if combined:
        auth = {"client_auth": "tls_client_auth", "client_cert_file": pki["client_combined"]}
    else:
        auth = {
            "client_auth": "tls_client_auth",
            "client_cert_file": pki["client_cert"],
            "client_key_file": pki["client_key"],
        }
    client = await start_proxy(aiohttp_client, _config(idp.token_url(), api_url, pki, auth))
    resp = await client.get("/v1/data")
    assert resp.status == 200, await resp.text()
    assert idp.refusals == []
    (request,) = idp.requests
    assert request["client_id"] == CLIENT_ID
    assert "client_secret" not in request and "client_assertion" not in request
    assert api.hits == 1


async def _refused_handshake(
    aiohttp_server: Any, aiohttp_client: Any, pki: dict[str, Any], auth: dict[str, Any]
) -> tuple[str, list[str]]:
    """A request through a proxy whose token endpoint refuses its TLS handshake: the 503's detail, and the
    token endpoint's reasons for each handshake it refused."""
    _, _, api_url = await _stack(aiohttp_server, pki)
    with AlertingTLSServer(pki["ca"]) as idp:
        client = await start_proxy(aiohttp_client, _config(idp.url + "/token", api_url, pki, auth))
        resp = await client.get("/v1/data")
        assert resp.status == 503
        detail = (await resp.json())["detail"]
        await client.close()
    return detail, idp.refused


async def test_token_endpoint_without_a_client_certificate_is_a_clear_failure(aiohttp_server, aiohttp_client, pki):
    """A token endpoint that requires a certificate the proxy does not present (it sends TLS 1.3's
    certificate_required alert): 503 saying so and naming auth.client_cert_file."""
    auth = {"client_auth": "body", "client_secret": "cs-never-sent-over-a-failed-handshake"}
    detail, refused = await _refused_handshake(aiohttp_server, aiohttp_client, pki, auth)
    assert "requires a client certificate; set auth.client_cert_file" in detail, detail
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refused


async def test_a_certificate_the_token_endpoint_does_not_trust_is_a_clear_failure(aiohttp_server, aiohttp_client, pki):
    """A client certificate from a CA the token endpoint does not trust: 503 saying it refused the certificate."""
    auth = {
        "client_auth": "tls_client_auth",
        "client_cert_file": pki["stranger_cert"],
        "client_key_file": pki["stranger_key"],
    }
    detail, refused = await _refused_handshake(aiohttp_server, aiohttp_client, pki, auth)
    assert "the server refused the client certificate (auth.client_cert_file)" in detail, detail
    assert "CERTIFICATE_VERIFY_FAILED" in refused


async def test_upstream_mutual_tls(aiohttp_server, aiohttp_client, pki):
    """An API that requires a client certificate gets upstream.client_cert_file (and the token endpoint
    its own, auth.client_cert_file: each side presents the certificate configured for it)."""
    idp, api, api_url = await _stack(aiohttp_server, pki, api_cn=API_CN)
    auth = {
        "client_auth": "tls_client_auth",
        "client_cert_file": pki["client_cert"],
        "client_key_file": pki["client_key"],
    }
    config = _config(
        idp.token_url(), api_url, pki, auth, client_cert_file=pki["api_cert"], client_key_file=pki["api_key"]
    )
    client = await start_proxy(aiohttp_client, config)
    resp = await client.get("/v1/data")
    assert resp.status == 200, await resp.text()
    assert api.hits == 1
    assert idp.refusals == []


async def test_upstream_without_the_certificate_it_requires_is_a_clear_502(aiohttp_server, aiohttp_client, pki):
    """An API that requires a client certificate the proxy does not have: 502 naming upstream.client_cert_file."""
    idp, _, _ = await _stack(aiohttp_server, pki)
    auth = {
        "client_auth": "tls_client_auth",
        "client_cert_file": pki["client_cert"],
        "client_key_file": pki["client_key"],
    }
    with AlertingTLSServer(pki["ca"]) as api:
        client = await start_proxy(aiohttp_client, _config(idp.token_url(), api.url, pki, auth))
        resp = await client.get("/v1/data")
        assert resp.status == 502
        detail = (await resp.json())["detail"]
        await client.close()
    assert "the server wants a client certificate (upstream.client_cert_file)" in detail, detail
    assert "Operation not permitted" not in detail


# --- configuration errors ------------------------------------------------------------------------


def _mapping(auth: dict[str, Any], upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    return client_credentials_mapping({"client_id": CLIENT_ID, **auth}, upstream)


@pytest.mark.parametrize(
    ("auth", "upstream", "key", "words"),
    [
        ({"client_auth": "tls_client_auth"}, {}, "auth.client_cert_file", "required for client_auth tls_client_auth"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{client_cert}"}, {}, "auth.client_cert_file",
         "no PEM certificate with its private key; give client_key_file too"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{client_cert}", "client_key_file": "{stranger_key}"},
         {}, "auth.client_key_file", "does not belong to the certificate"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{missing}", "client_key_file": "{client_key}"},
         {}, "auth.client_cert_file", "no such file"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{client_key}", "client_key_file": "{client_key}"},
         {}, "auth.client_cert_file", "holds no PEM certificate"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{encrypted_combined}"}, {}, "auth.client_cert_file",
         "holds an encrypted private key"),
        ({"client_auth": "tls_client_auth", "client_cert_file": "{client_cert}", "client_key_file": "{encrypted_key}"},
         {}, "auth.client_key_file", "holds an encrypted private key"),
        ({"client_secret": "s3cret-xyz"}, {"client_key_file": "{client_key}"}, "upstream.client_cert_file",
         "required with upstream.client_key_file"),
        ({"client_secret": "s3cret-xyz"}, {"client_cert_file": "{client_cert}"}, "upstream.client_cert_file",
         "give client_key_file too"),
        ({"client_secret": "s3cret-xyz"}, {"client_cert_file": "{client_cert}", "client_key_file": "{stranger_key}"},
         "upstream.client_key_file", "does not belong to the certificate"),
    ],
    ids=["no-cert", "cert-without-key", "key-mismatch", "missing-cert", "key-as-cert", "encrypted-combined",
         "encrypted-key", "up-key-no-cert",
         "up-cert-without-key", "up-key-mismatch"],
)  # fmt: skip
def test_certificate_configuration_errors_name_the_key(pki, tmp_path, auth, upstream, key, words):
    """Each bad certificate setting is one ConfigError naming the key, never quoting a file."""
    files = {k: v for k, v in pki.items() if isinstance(v, str)} | {"missing": str(tmp_path / "nope.crt")}
    fill = lambda table: {k: v.format(**files) for k, v in table.items()}  # noqa: E731
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(_mapping(fill(auth), fill(upstream)), source="test.toml")
    assert caught.value.key == key
    assert words in caught.value.problem
    assert "BEGIN" not in str(caught.value)
    assert Path(pki["client_key"]).read_text().splitlines()[1] not in str(caught.value)


def test_upstream_certificate_needs_an_https_upstream(pki):
    """upstream.client_cert_file with an http:// upstream would never be presented: a configuration error."""
    mapping = _mapping({"client_secret": "s3cret-xyz"}, {"client_cert_file": pki["client_cert"]})
    mapping["upstream"].update(url="http://127.0.0.1:9", client_key_file=pki["client_key"])
    with pytest.raises(ConfigError, match=r"upstream\.client_cert_file: only used with an https:// upstream"):
        config_from_mapping(mapping)


def test_private_key_jwt_with_a_certificate_names_it_by_thumbprint(pki):
    """private_key_jwt with auth.client_cert_file (Entra ID): the assertion header carries the certificate's
    x5t (SHA-1) and x5t#S256 thumbprints, and the signature verifies with the certificate's public key."""
    import base64
    import hashlib

    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from proxy.client_auth import ClientAuthenticator

    mapping = _mapping(
        {"client_auth": "private_key_jwt", "client_key_file": pki["client_key"], "client_cert_file": pki["client_cert"]}
    )
    authenticator = ClientAuthenticator(config_from_mapping(mapping).auth)
    made = authenticator.apply({}, {}, "https://idp.example/token")
    cert = x509.load_pem_x509_certificate(Path(pki["client_cert"]).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()  # noqa: E731
    header = jwt.get_unverified_header(made)
    assert header["x5t"] == b64(hashlib.sha1(der).digest())
    assert header["x5t#S256"] == b64(hashlib.sha256(der).digest())
    jwt.decode(made, cert.public_key(), algorithms=[header["alg"]], audience="https://idp.example/token")


async def test_check_presents_the_client_certificate(aiohttp_server, pki, capsys):
    """`--check` logs in over the same mutual TLS as the proxy: tls_client_auth works there too."""
    from proxy import cli

    idp, _, api_url = await _stack(aiohttp_server, pki)
    auth = {
        "client_auth": "tls_client_auth",
        "client_cert_file": pki["client_cert"],
        "client_key_file": pki["client_key"],
    }
    assert await cli.check(_config(idp.token_url(), api_url, pki, auth)) == 0
    assert capsys.readouterr().out.startswith("ok: logged in to oauth2")
    assert idp.refusals == [] and len(idp.requests) == 1
