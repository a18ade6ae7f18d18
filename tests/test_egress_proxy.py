"""Egress through a real forward proxy (Debian's tinyproxy, started per test on a free port).

The upstream and the token endpoint are TLS servers on 127.0.0.1, addressed as ``localhost``, with
certificates from a test CA that name ``localhost`` only: a connection that verified against the
proxy's address (127.0.0.1) instead of the real host would fail, so a 200 shows verification end to end.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import make_app
from proxy.config import Config, load_config
from proxy.demo import DemoAPI, DemoIdP
from tests.fakes.servers import FAST_BACKOFF

PROXY_USER, PROXY_PASSWORD = "alice", "pr0xy-Pass-7731"
WRONG_PASSWORD = "wr0ng-Pass-0042"
TINYPROXY = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")


# --- certificates and servers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A test CA and two server certificates it signed: one for localhost, one for other.example."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make the test certificates")
    folder = tmp_path_factory.mktemp("egress-tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    ca, ca_key = str(folder / "ca.pem"), str(folder / "ca.key")
    run("req", "-x509", *ec, "-days", "2", "-keyout", ca_key, "-out", ca, "-subj", "/CN=egress test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    files = {"ca": ca}
    for name in ("localhost", "other.example"):
        key, csr, cert, ext = (str(folder / f"{name}.{kind}") for kind in ("key", "csr", "pem", "ext"))
        Path(ext).write_text(
            f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        run("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-out", cert, "-extfile", ext)  # fmt: skip
        files[name], files[f"{name}_key"] = cert, key
    return files


def _server_tls(certs: dict[str, str], name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs[name], certs[f"{name}_key"])
    return context


async def _tls_servers(aiohttp_server: Any, certs: dict[str, str], api_cert: str = "localhost") -> tuple[DemoIdP, int]:
    """The demo identity provider and API over TLS; returns the idp (its base_url https://localhost:N)
    and the API's port."""
    idp = DemoIdP()
    idp_server = await aiohttp_server(idp.app(), ssl=_server_tls(certs, "localhost"))
    idp.base_url = f"https://localhost:{idp_server.port}"
    api_server = await aiohttp_server(DemoAPI(idp).app(), ssl=_server_tls(certs, api_cert))
    return idp, api_server.port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """Starts tinyproxy in the foreground with the given extra config lines; returns its port and log file.
    Every one started is stopped by its pid at the end of the test."""
    if TINYPROXY is None:
        pytest.fail("tinyproxy is needed (apt-get install tinyproxy; .ci/run installs it)")
    started: list[subprocess.Popen[bytes]] = []

    def start(*lines: str) -> tuple[int, Path]:
        port = _free_port()
        log = tmp_path / f"tinyproxy-{port}.log"
        conf = tmp_path / f"tinyproxy-{port}.conf"
        settings = ["LogLevel Connect", "DisableViaHeader Yes", "Timeout 10", "MaxClients 20", *lines]
        conf.write_text("\n".join([f"Port {port}", "Listen 127.0.0.1", f'LogFile "{log}"', *settings]) + "\n")
        proc = subprocess.Popen(
            [str(TINYPROXY), "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(proc)
        deadline = time.monotonic() + 5
        while True:  # bounded: until it accepts connections, at most 5 s
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return port, log
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"tinyproxy did not start (exit {proc.poll()}): {log.read_text() if log.exists() else ''}"
                    )
                time.sleep(0.02)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _config(tmp_path: Path, idp: DemoIdP, api_url: str, ca: str, env: dict[str, str], **keys: str) -> Config:
    """A keycloak-preset config in a TOML file, loaded with ``env`` as the process environment would be."""
    upstream = {"url": api_url, "ca_file": ca}
    auth = {"provider": "keycloak", "token_url": idp.token_url(), "client_id": "demo-client", "username": "demo"}
    for key, value in keys.items():
        section, _, name = key.partition("__")
        (upstream if section == "upstream" else auth)[name] = value
    lines = ["[listen]", "port = 0", "[upstream]", *(f"{k} = {json.dumps(v)}" for k, v in upstream.items())]
    lines += ["[auth]", *(f"{k} = {json.dumps(v)}" for k, v in auth.items())]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": "demo", **env})


async def _sidecar(aiohttp_client: Any, config: Config) -> Any:
    return await aiohttp_client(make_app(config, **FAST_BACKOFF))


async def _ready(client: Any) -> dict[str, Any]:
    """/-/ready once the first login has been tried (bounded: 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        resp = await client.get("/-/ready")
        body = await resp.json()
        if resp.status == 200 or body.get("state") not in ("starting", "logging_in") or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


def _requests_seen(log: Path) -> list[str]:
    """The request lines tinyproxy logged (``CONNECT localhost:443 HTTP/1.1``, ``GET http://...``)."""
    return [line.split("): ", 1)[1] for line in log.read_text().splitlines() if "Request (file descriptor" in line]


# --- through the proxy ---------------------------------------------------------------------------


async def test_https_upstream_and_token_endpoint_through_https_proxy(
    aiohttp_server, aiohttp_client, tinyproxy, tmp_path, certs
):
    """With HTTPS_PROXY set, the login and the API call both go through CONNECT tunnels, TLS verified
    against localhost (not the proxy's 127.0.0.1) end to end; /-/status names the proxy."""
    idp, api_port = await _tls_servers(aiohttp_server, certs)
    port, log = tinyproxy()
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{port}"}
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, f"https://localhost:{api_port}", certs["ca"], env))
    resp = await client.get("/v1/hello")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["subject"] == "demo"
    seen = _requests_seen(log)
    assert f"CONNECT localhost:{idp.base_url.rsplit(':', 1)[1]} HTTP/1.1" in seen
    assert f"CONNECT localhost:{api_port} HTTP/1.1" in seen
    status = await (await client.get("/-/status")).json()
    assert status["proxy"] == {"upstream": f"127.0.0.1:{port}", "token_endpoint": f"127.0.0.1:{port}"}
    # A second request reuses the tunnel (the pool keeps it): no new CONNECT.
    assert (await client.get("/v1/hello")).status == 200
    assert _requests_seen(log).count(f"CONNECT localhost:{api_port} HTTP/1.1") == 1


async def test_certificate_for_another_name_through_the_tunnel_is_a_502(
    aiohttp_server, aiohttp_client, tinyproxy, tmp_path, certs
):
    """An upstream whose certificate (from the trusted CA) names other.example is refused through the
    tunnel: 502 naming the failed verification and the proxy."""
    idp, api_port = await _tls_servers(aiohttp_server, certs, api_cert="other.example")
    port, _ = tinyproxy()
    env = {"HTTPS_PROXY": f"127.0.0.1:{port}"}  # without a scheme, as curl and requests accept it
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, f"https://localhost:{api_port}", certs["ca"], env))
    resp = await client.get("/v1/hello")
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "upstream_unreachable"
    assert "TLS certificate verification failed" in body["detail"]
    assert f"through the proxy 127.0.0.1:{port}" in body["detail"]


async def test_no_proxy_goes_direct_and_proxy_url_overrides_per_side(aiohttp_server, aiohttp_client, tmp_path, certs):
    """HTTPS_PROXY names a port where nothing listens: NO_PROXY=localhost reaches both directly; without
    it (and the token endpoint direct by auth.proxy_url = "") the upstream is a 502 naming the proxy."""
    idp, api_port = await _tls_servers(aiohttp_server, certs)
    dead = _free_port()
    api_url = f"https://localhost:{api_port}"
    env = {"https_proxy": f"http://127.0.0.1:{dead}", "no_proxy": "example.com, .localhost,localhost"}
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, api_url, certs["ca"], env))
    assert (await client.get("/v1/hello")).status == 200
    assert (await (await client.get("/-/status")).json())["proxy"] == {"upstream": None, "token_endpoint": None}

    env = {"HTTPS_PROXY": f"http://127.0.0.1:{dead}", "NO_PROXY": "notlocalhost,127.0.0.1"}
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, api_url, certs["ca"], env, auth__proxy_url=""))
    resp = await client.get("/v1/hello")
    assert resp.status == 502
    detail = (await resp.json())["detail"]
    assert f"cannot connect to the proxy 127.0.0.1:{dead} (HTTPS_PROXY)" in detail


async def test_a_proxy_that_refuses_the_tunnel_is_a_clear_502(
    aiohttp_server, aiohttp_client, tinyproxy, tmp_path, certs
):
    """tinyproxy allowing CONNECT to port 1 only answers 403 for the upstream's port: the client gets a
    JSON 502 naming the proxy and its status, never the proxy's page."""
    idp, api_port = await _tls_servers(aiohttp_server, certs)
    port, _ = tinyproxy("ConnectPort 1")
    config = _config(
        tmp_path, idp, f"https://localhost:{api_port}", certs["ca"], {},
        upstream__proxy_url=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    client = await _sidecar(aiohttp_client, config)
    resp = await client.get("/v1/hello")
    assert resp.status == 502
    text = await resp.text()
    body = json.loads(text)
    assert body["error"] == "upstream_unreachable"
    assert (
        f"the proxy 127.0.0.1:{port} (upstream.proxy_url) refused the tunnel to localhost:{api_port} (403"
        in body["detail"]
    )
    assert "tinyproxy" not in text.lower() and "<" not in text


@pytest.mark.parametrize("password", [PROXY_PASSWORD, WRONG_PASSWORD, None])
async def test_proxy_that_needs_credentials(
    aiohttp_server, aiohttp_client, tinyproxy, tmp_path, certs, caplog, password
):
    """tinyproxy with BasicAuth: the right credentials in HTTPS_PROXY carry the login and the API call;
    wrong or missing ones give a 503 (login) and a 502 (upstream) saying so. The password never shows
    in a log record, a response or /-/status."""
    idp, api_port = await _tls_servers(aiohttp_server, certs)
    port, log = tinyproxy(f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}")
    userinfo = f"{PROXY_USER}:{password}@" if password else ""
    env = {"HTTPS_PROXY": f"http://{userinfo}127.0.0.1:{port}"}
    api_url = f"https://localhost:{api_port}"
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, api_url, certs["ca"], env))
    outputs = []
    ready = await _ready(client)
    outputs.append(json.dumps(ready))
    resp = await client.get("/v1/hello")
    outputs.append(await resp.text())
    if password == PROXY_PASSWORD:
        assert resp.status == 200, outputs
        assert f"CONNECT localhost:{api_port} HTTP/1.1" in _requests_seen(log)
    else:
        assert resp.status == 503
        words = "refused the credentials in its URL" if password else "needs credentials"
        assert words in ready["detail"]
        assert f"the proxy 127.0.0.1:{port} (HTTPS_PROXY)" in ready["detail"]
        # The upstream side alone (the token endpoint direct): a 502 with the same words.
        config = _config(tmp_path, idp, api_url, certs["ca"], env, auth__proxy_url="")
        direct_login = await _sidecar(aiohttp_client, config)
        resp = await direct_login.get("/v1/hello")
        outputs.append(await resp.text())
        assert resp.status == 502
        assert words in (await resp.json())["detail"]
    outputs.append(await (await client.get("/-/status")).text())
    outputs += [record.getMessage() + repr(getattr(record, "fields", "")) for record in caplog.records]
    for secret in (PROXY_PASSWORD, WRONG_PASSWORD):
        assert all(secret not in text for text in outputs)


async def test_plain_http_targets_through_the_proxy_in_absolute_form(
    aiohttp_server, aiohttp_client, tinyproxy, tmp_path, certs
):
    """http:// (loopback) token endpoint and upstream with HTTP_PROXY set: the proxy gets absolute-form
    requests carrying its credentials (tinyproxy wants them), and the upstream never sees them."""
    idp = DemoIdP()
    idp_server = await aiohttp_server(idp.app())
    idp.base_url = f"http://127.0.0.1:{idp_server.port}"
    api = await aiohttp_server(DemoAPI(idp).app())
    port, log = tinyproxy(f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}")
    env = {"HTTP_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}", "HTTPS_PROXY": "http://127.0.0.1:1"}
    client = await _sidecar(aiohttp_client, _config(tmp_path, idp, f"http://127.0.0.1:{api.port}", certs["ca"], env))
    resp = await client.get("/v1/echo/x?q=1")  # the demo API echoes what it got
    assert resp.status == 200, await resp.text()
    echoed = await resp.json()
    assert "proxy-authorization" not in {k.lower() for k, _ in echoed["headers"]}
    seen = _requests_seen(log)
    assert f"POST {idp.token_url()} HTTP/1.1" in seen
    assert f"GET http://127.0.0.1:{api.port}/v1/echo/x?q=1 HTTP/1.1" in seen
    assert not any(line.startswith("CONNECT") for line in seen)
