"""Which proxy a request goes through (proxy/egress.py, pure), its configuration, and how the upstream
pool reads a proxy's answer to CONNECT (against a fake proxy speaking raw bytes)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import cli
from proxy.config import load_config
from proxy.egress import (
    Egress,
    EgressError,
    EgressProxy,
    bypasses,
    credential_strings,
    parse_no_proxy,
    parse_proxy_url,
)
from proxy.errors import ConfigError, UpstreamUnreachable
from proxy.upstream import MAX_TUNNEL_HEAD, Pool

PROXY = {"HTTPS_PROXY": "http://proxy.corp:3128"}


def _via(env: dict[str, str], url: str, override: str | None = None) -> str | None:
    proxy = Egress(override, env, "upstream.proxy_url").for_url(url)
    return None if proxy is None else proxy.address


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "https://api.example", None),
        (PROXY, "https://api.example", "proxy.corp:3128"),
        (PROXY, "http://127.0.0.1:8080", None),  # http:// targets read HTTP_PROXY
        ({"HTTP_PROXY": "http://p:1"}, "http://127.0.0.1:8080", "p:1"),
        ({"http_proxy": "http://p:1"}, "https://api.example", None),
        ({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, "https://a.example", "low:1"),
        ({"https_proxy": "", "HTTPS_PROXY": "http://up:2"}, "https://a.example", None),  # set and empty: no proxy
        ({"HTTPS_PROXY": "p"}, "https://a.example", "p:80"),  # no scheme: http://; no port: 80
        ({"HTTPS_PROXY": "http://[::1]:3128/"}, "https://a.example", "[::1]:3128"),
        ({"ALL_PROXY": "http://p:1"}, "https://a.example", None),  # not read
    ],
)
def test_the_environment_picks_the_proxy_by_the_target_scheme(env, url, expected):
    """HTTPS_PROXY for https://, HTTP_PROXY for http://, lower case first, an empty value meaning none."""
    assert _via(env, url) == expected


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("example.com", "https://example.com", True),
        ("example.com", "https://api.example.com", True),
        ("example.com", "https://notexample.com", False),
        ("example.com", "https://example.com.evil.test", False),
        (".example.com", "https://example.com", True),
        (".example.com", "https://a.b.example.com", True),
        ("*.example.com", "https://x.example.com", True),
        ("*", "https://anything.test", True),
        ("a.test, *", "https://anything.test", True),
        ("a.test ,  b.test", "https://b.test", True),
        ("EXAMPLE.com", "https://Example.COM./x", True),
        ("10.0.0.0/8", "https://10.1.2.3", True),
        ("10.0.0.0/8", "https://11.0.0.1", False),
        ("10.0.0.0/8", "https://ten.example", False),  # names are never resolved to match an address
        ("192.168.1.5", "https://192.168.1.5:8443", True),
        ("::1", "https://[::1]:8443", True),
        ("[::1]", "https://[::1]:8443", True),
        ("fd00::/8", "https://[fd12::1]/", True),
        ("example.com:8443", "https://example.com:8443", True),
        ("example.com:8443", "https://example.com", False),
        ("[::1]:8443", "https://[::1]:8443", True),
        ("[::1]:8443", "https://[::1]:9", False),
        ("exa mple.com,::zz,host:port", "https://example.com", False),  # unusable entries match nothing
        ("", "https://example.com", False),
    ],
)
def test_no_proxy(no_proxy, url, direct):
    """NO_PROXY as curl reads it: domains with their subdomains (on a dot boundary), leading dots and
    "*.", "*", IPs and CIDRs for address targets, ports, case and a trailing dot ignored."""
    assert _via({**PROXY, "NO_PROXY": no_proxy}, url) == (None if direct else "proxy.corp:3128")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    no_proxy=st.lists(st.text(alphabet="ab.:[]/*0123456789f, ", max_size=12), max_size=4).map(",".join),
    host=st.sampled_from(["a.b", "b", "ab", "::1", "10.0.0.1", "[::1]", ""]),
    port=st.integers(1, 65535),
)
def test_no_proxy_never_raises_and_star_always_bypasses(no_proxy, host, port):
    """Any NO_PROXY text parses (unusable entries match nothing); adding "*" makes every target direct."""
    bypasses(parse_no_proxy(no_proxy), host, port)
    assert bypasses(parse_no_proxy(no_proxy + ",*"), host, port)


def test_lower_case_no_proxy_wins():
    """no_proxy is read before NO_PROXY, as curl and Python's urllib do."""
    env = {**PROXY, "no_proxy": "a.test", "NO_PROXY": "example.com"}
    assert _via(env, "https://example.com") == "proxy.corp:3128"
    assert _via(env, "https://a.test") is None


def test_an_explicit_proxy_url_replaces_the_environment():
    """proxy_url "" is direct whatever the environment says; a URL is used for every target, NO_PROXY or not."""
    env = {**PROXY, "HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}
    assert _via(env, "https://a.example", override="") is None
    assert _via(env, "https://a.example", override="http://mine:8080") == "mine:8080"
    assert _via(env, "http://127.0.0.1:1", override="http://mine:8080") == "mine:8080"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://p:1", "an https:// proxy (TLS to the proxy itself) is not supported"),
        ("socks5://p:1", "only http proxies are supported"),
        ("http://:1", "no valid host"),
        ("http://p:99999", "not a valid URL or port"),
        ("http://p:1/path", "no path, query or fragment"),
        ("http://p:1?x=1", "no path, query or fragment"),
        ("http://u:pa ss@p:1", "whitespace or control characters"),
        ("http://a%3Ab:c@p:1", "must not contain ':'"),
        ("http://u:a%0Db@p:1", "control characters"),
    ],
)
def test_unusable_proxy_urls_are_refused_naming_the_setting(url, words):
    """A proxy URL that cannot be used raises an error naming its key and the problem, never the URL."""
    with pytest.raises(EgressError) as caught:
        parse_proxy_url(url, "HTTPS_PROXY")
    assert caught.value.key == "HTTPS_PROXY"
    assert words in caught.value.problem
    assert url not in str(caught.value)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    password=st.text(min_size=1, max_size=30).map(lambda s: "Zq" + s),
    scheme=st.sampled_from(["http", "https", "socks5", ""]),
    host=st.sampled_from(["proxy.corp", "10.0.0.1", "[::1]", "", "bad host"]),
)
def test_a_proxy_password_never_shows_in_an_error(password, scheme, host):
    """Whatever the URL, parsing it either gives back the password exactly (and a Basic value that
    decodes to user:password) or fails with a message that does not contain it."""
    url = f"{scheme + '://' if scheme else ''}user:{quote(password, safe='')}@{host}:3128"
    try:
        proxy = parse_proxy_url(url, "upstream.proxy_url")
    except EgressError as exc:
        assert password not in str(exc) and quote(password, safe="") not in str(exc)
        return
    assert proxy.password == password
    assert repr(proxy).count(password) == 0
    assert proxy.authorization is not None
    assert base64.b64decode(proxy.authorization.removeprefix("Basic ")).decode() == f"user:{password}"
    assert set(credential_strings(url)) >= {password, quote(password, safe="")}


# --- configuration -------------------------------------------------------------------------------

TOML = """
[upstream]
url = "https://api.example"
[auth]
provider = "keycloak"
token_url = "https://idp.example/realms/x/protocol/openid-connect/token"
client_id = "c"
username = "u"
"""
PASSWORD_ENV = {"OAUTH_SIDECAR_AUTH_PASSWORD": "user-password"}


def _load(tmp_path: Path, extra: str = "", **env: str):
    path = tmp_path / "config.toml"
    path.write_text(TOML + extra)
    return load_config(path, {**PASSWORD_ENV, **env})


def test_proxy_url_unset_empty_and_set(tmp_path):
    """Unset: the environment decides; "" (in TOML or as OAUTH_SIDECAR_..._PROXY_URL=): direct."""
    config = _load(tmp_path, HTTPS_PROXY="http://p:1")
    assert (config.upstream.proxy_url, config.auth.proxy_url) == (None, None)
    assert config.egress("upstream").for_url(config.upstream.url) == EgressProxy("p", 1, source="HTTPS_PROXY")
    config = _load(tmp_path, HTTPS_PROXY="http://p:1", OAUTH_SIDECAR_UPSTREAM_PROXY_URL="")
    assert config.upstream.proxy_url == ""
    assert config.egress("upstream").for_url(config.upstream.url) is None
    assert config.egress("auth").for_url(config.auth.token_url) is not None
    config = _load(tmp_path.joinpath(), extra='proxy_url = "http://idp-proxy:8080"\n')
    assert config.egress("auth").for_url(config.auth.token_url) == EgressProxy(
        "idp-proxy", 8080, source="auth.proxy_url"
    )


def test_a_bad_proxy_variable_exits_2_naming_it_and_not_its_password(tmp_path, capsys):
    """HTTPS_PROXY=socks5://... is a configuration error (exit 2) naming the variable; its password is not printed."""
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    env = {**PASSWORD_ENV, "OAUTH_SIDECAR_CONFIG": str(path), "HTTPS_PROXY": "socks5://u:Hunter2pw@h:1"}
    assert cli.main(["--check"], env=env) == 2
    err = capsys.readouterr().err
    assert "HTTPS_PROXY: must look like http://" in err
    assert "Hunter2pw" not in err


def test_a_variable_no_configured_url_uses_is_not_checked(tmp_path):
    """http_proxy pointing at a SOCKS proxy (for other programs) does not stop a sidecar whose URLs are all https."""
    assert _load(tmp_path, http_proxy="socks5://h:1").upstream.url == "https://api.example"


def test_an_https_proxy_url_is_refused_at_load(tmp_path):
    """upstream.proxy_url = "https://..." exits 2 naming the key: TLS to the proxy is not implemented."""
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path.joinpath(), extra="", OAUTH_SIDECAR_UPSTREAM_PROXY_URL="https://u:Secretpw9@p:1")
    assert caught.value.key == "upstream.proxy_url"
    assert "not supported" in caught.value.problem
    assert "Secretpw9" not in str(caught.value)


def test_proxy_credentials_are_secrets(tmp_path):
    """The proxy passwords (from either key or the environment) are in Config.secrets() for redaction, and
    never in the config's repr."""
    config = _load(
        tmp_path,
        HTTPS_PROXY="http://a:Env%2Fpass1@p:1",
        OAUTH_SIDECAR_UPSTREAM_PROXY_URL="http://b:Keypass22@q:2",
    )
    secrets = config.secrets()
    for value in ("Env%2Fpass1", "Env/pass1", "Keypass22", base64.b64encode(b"b:Keypass22").decode()):
        assert value in secrets
    assert "Keypass22" not in repr(config) and "Env" not in repr(config)


# --- the CONNECT answer, read strictly (a fake proxy) --------------------------------------------

SECRET_BODY = b"<html>proxy page SECRET-BODY</html>"


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 36\r\n\r\n" + SECRET_BODY,
            "refused the credentials",
        ),
        (b"HTTP/1.0 403 Forbidden\r\n\r\n" + SECRET_BODY, "refused the tunnel to localhost:1 (403 Forbidden)"),
        (
            b"HTTP/1.1 500 Whatever the proxy says\r\n\r\n",
            "refused the tunnel to localhost:1 (500 Internal Server Error)",
        ),
        (b"HTTP/1.1 299 Odd\r\n\r\n", "refused the tunnel to localhost:1 (299 an unknown status)"),
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_TUNNEL_HEAD, "ran past 8 KiB"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "sent a malformed answer to CONNECT"),
        (b"HTTP/1.1 200 OK\nX: y\r\n\r\n", "sent a malformed answer to CONNECT"),
        (b"HTTP/2 200\r\n\r\n", "sent a malformed answer to CONNECT"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + SECRET_BODY, "sent bytes after its answer to CONNECT"),
        (b"HTTP/1.1 200 O", "closed the connection before answering CONNECT"),
    ],
)
async def test_a_proxy_answer_other_than_200_is_a_clear_502(raw_server, answer, words):
    """The pool sends CONNECT with the proxy's credentials and the upstream's authority; any answer but a
    well-formed 200 with nothing after it fails the request naming the proxy, never relaying its body."""
    seen: list[bytes] = []

    async def fake_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        if answer != b"HTTP/1.1 200 O":
            await reader.read()  # until the pool hangs up

    port = int((await raw_server(fake_proxy)).rsplit(":", 1)[1])
    proxy = parse_proxy_url(f"http://user:Pw-{port}@127.0.0.1:{port}", "HTTPS_PROXY")
    pool = Pool(
        "https://localhost:1",
        limit=1,
        connect_timeout_s=1.0,
        timeout_s=1.0,
        ssl_context=ssl.create_default_context(),
        proxy=proxy,
    )
    with pytest.raises(UpstreamUnreachable) as caught:
        await pool.request("GET", b"GET / HTTP/1.1\r\nHost: localhost:1\r\n\r\n", None)
    await pool.close()
    detail = caught.value.detail
    assert words in detail
    assert f"127.0.0.1:{port} (HTTPS_PROXY)" in detail or "through the proxy" in detail
    assert "SECRET-BODY" not in detail and f"Pw-{port}" not in detail
    credentials = base64.b64encode(f"user:Pw-{port}".encode()).decode()
    assert seen == [
        b"CONNECT localhost:1 HTTP/1.1\r\nHost: localhost:1\r\nProxy-Authorization: Basic %s\r\n\r\n"
        % credentials.encode()
    ]
    assert pool.open_connections == 0


async def test_plain_http_through_a_proxy_sends_absolute_form_and_a_407_is_not_relayed(raw_server):
    """A plain http:// upstream through a proxy: the request line carries the absolute URL and the
    proxy's credentials follow it; the proxy's 407 becomes the proxy's own error, never the upstream's answer."""
    heads: list[bytes] = []

    async def fake_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 36\r\n\r\n" + SECRET_BODY)
        await writer.drain()

    port = int((await raw_server(fake_proxy)).rsplit(":", 1)[1])
    pool = Pool(
        "http://127.0.0.1:9/base",
        limit=1,
        connect_timeout_s=1.0,
        timeout_s=1.0,
        ssl_context=None,
        proxy=parse_proxy_url(f"http://u:p@127.0.0.1:{port}", "HTTP_PROXY"),
    )
    with pytest.raises(UpstreamUnreachable) as caught:
        await pool.request("GET", b"GET /base/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", None)
    await pool.close()
    assert "refused the credentials in its URL (407 Proxy Authentication Required)" in caught.value.detail
    assert heads == [
        b"GET http://127.0.0.1:9/base/x?q=1 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\nHost: 127.0.0.1:9\r\n\r\n"
    ]
    assert pool.open_connections == 0
    assert json.dumps(caught.value.detail).count("SECRET") == 0
