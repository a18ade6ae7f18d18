"""Configuration: TOML, then environment overrides, then ``*_file`` secrets, into frozen dataclasses.

Every key and its default is a field of the frozen dataclasses below (:data:`SCHEMA`, the key -> type
and default table the loader works from, is read from them); every check is in :func:`_validate`.
Whatever is wrong raises one :class:`~proxy.errors.ConfigError` naming the source (file or
environment variable), the key and the problem, before anything starts.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .client_auth import (
    CLIENT_AUTH_METHODS,
    JWT_METHODS,
    MIN_HMAC_BYTES,
    KeyFileError,
    certificate_thumbprints,
    check_client_cert,
    load_signing_key,
)
from .egress import NO_PROXY_VARIABLES, Egress, EgressError, credential_strings, proxy_environment
from .errors import ConfigError
from .providers import PRESETS, Preset
from .wire import HOP_BY_HOP

ENV_PREFIX = "OAUTH_SIDECAR_"
ENV_CONFIG_PATH = "OAUTH_SIDECAR_CONFIG"
DEFAULT_CONFIG_PATH = "config.toml"
# The configuration keys whose values are secrets, in the order Config.secrets() gives them. Each may
# come from a file instead (`<key>_file`, `OAUTH_SIDECAR_<SECTION>_<KEY>_FILE`).
SECRET_KEYS: tuple[tuple[str, str], ...] = (
    ("auth", "password"),
    ("auth", "client_secret"),
    ("auth", "refresh_token"),
    ("auth", "code"),
    ("auth", "code_verifier"),
    ("access", "api_key"),
    ("store", "key"),
    ("store", "password"),
)
STORE_KINDS = ("memory", "file", "redis")
STORE_MODES = ("standalone", "sentinel", "cluster")
MIN_STORE_KEY_CHARS = 32
# listen.workers > 1 needs the kernel to spread connections over the workers' sockets on one port
# (SO_REUSEPORT as Linux has it; BSD and macOS accept the option but give every connection to one socket),
# and fork() to start them.
WORKERS_SUPPORTED = sys.platform.startswith("linux")
MAX_WORKERS = 64
# Integer keys that also take "auto": the number of CPUs this process may run on (1 where more than one
# worker is not supported), at most MAX_WORKERS.
AUTO_KEYS = frozenset({("listen", "workers")})
GRANT_TYPES = ("password", "client_credentials", "refresh_token", "authorization_code")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPBACK_NAMES = ("localhost",)
# A secret is a few KiB at most (a refresh token, a PEM key); a larger file is a mistake (/dev/zero, a log),
# and is not read further.
MAX_SECRET_BYTES = 1 << 20
# RFC 9110 §5.6.2: the characters of a header name (a token).
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Header names [inject] headers may not set: hop-by-hop ones (RFC 9110 §7.6.1) and those the proxy writes
# itself (Host, the framing, X-Request-Id), with the "_" spellings of the framing ones that the proxy drops.
RESERVED_STATIC_HEADERS = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-request-id",
    "content_length",
    "transfer_encoding",
}

# Field metadata for a value the loader sets itself (from the preset): not a configuration key.
NOT_A_KEY = MappingProxyType({"key": False})
# Field metadata for a string key whose default is None, "not set", told apart from "" (proxy_url).
UNSET_STRING = MappingProxyType({"type": str})


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8360
    allowed_hosts: tuple[str, ...] = ()
    shutdown_grace_s: float = 30.0
    max_connections: int = 1024
    idle_timeout_s: float = 75.0
    # Bytes a second a request body must average over any idle_timeout_s spent waiting for it; 0 = off.
    min_body_rate: float = 1024.0
    # Processes serving the port (proxy/workers.py): each a whole sidecar, all sharing one token.
    workers: int = 1


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = ""
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    ca_file: str = ""
    pool_size: int = 100
    replay_limit_bytes: int = 65536
    # None: from HTTPS_PROXY/HTTP_PROXY/NO_PROXY; "": direct; else http://[user:password@]host:port (proxy/egress.py).
    proxy_url: str | None = field(default=None, repr=False, metadata=UNSET_STRING)
    # Mutual TLS to the upstream: a client certificate (PEM) and its key, offered when the API asks for one.
    client_cert_file: str = ""
    client_key_file: str = ""


@dataclass(frozen=True)
class AuthConfig:
    provider: str = "we360"
    token_url: str = ""
    issuer: str = ""
    grant_type: str = "password"
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    refresh_token: str = field(default="", repr=False)
    code: str = field(default="", repr=False)
    code_verifier: str = field(default="", repr=False)  # PKCE (RFC 7636): sent with the code exchange only
    redirect_uri: str = ""
    scope: str = ""
    body: str = "form"
    # proxy/client_auth.py: body | basic | client_secret_jwt | private_key_jwt | tls_client_auth
    client_auth: str = "body"
    client_key_file: str = ""  # PEM private key: signs private_key_jwt assertions; the TLS key of client_cert_file
    client_key_alg: str = ""  # RS256 | PS256 | ES256 (HS256 for client_secret_jwt); "": from the key type
    client_key_id: str = ""  # the assertion's kid header
    assertion_audience: str = ""  # the assertion's aud; "": the token endpoint (Auth0 wants its tenant URL)
    client_cert_file: str = ""  # PEM client certificate for the token endpoint (tls_client_auth; x5t in assertions)
    refresh_margin_s: float = 60.0
    default_lifetime_s: float = 36000.0
    revoke_on_shutdown: bool = False
    revoke_url: str = ""
    logout_url: str = ""
    timeout_s: float = 30.0
    proxy_url: str | None = field(default=None, repr=False, metadata=UNSET_STRING)  # as upstream.proxy_url
    # Values keep their TOML type: a JSON token body sends true/3 as JSON, a form sends "true"/"3".
    extra: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    auth_string: bool = field(default=False, metadata=NOT_A_KEY)  # from the preset: send base64(username:password)


@dataclass(frozen=True)
class InjectConfig:
    header: str = "Authorization"
    value: str = "Bearer {token}"
    # Static headers sent upstream with every request beside the token (e.g. Ocp-Apim-Subscription-Key): name ->
    # value. Every value is a secret. After loading, it also holds the values read from ``headers_file``.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers_file: Mapping[str, str] = field(default_factory=dict)  # name -> a file holding the value


@dataclass(frozen=True)
class AccessConfig:
    allow_methods: tuple[str, ...] = ()
    allow_paths: tuple[str, ...] = ()
    api_key: str = field(default="", repr=False)
    allow_origins: tuple[str, ...] = ()
    allow_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"
    access_log: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """Where the token is kept: this process only (memory), one host (file) or a fleet (redis)."""

    kind: str = "memory"
    path: str = ""  # file: the store file (its lock is path + ".lock")
    url: str = ""  # redis: redis://, rediss:// or unix://
    mode: str = "standalone"  # redis: standalone | sentinel | cluster
    sentinels: tuple[str, ...] = ()  # sentinel: host:port of each sentinel (url names the master: redis://name)
    username: str = ""  # redis ACL user
    password: str = field(default="", repr=False)
    ca_file: str = ""  # rediss://: extra CA bundle
    key: str = field(default="", repr=False)  # encrypts the entry (at least 32 characters, stretched by HKDF)
    prefix: str = "oauth-sidecar"
    lease_s: float = 0.0  # how long a renewal lease lives; 0: auth.timeout_s + 5 s


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    log: LogConfig = field(default_factory=LogConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    source: str = ""  # where the configuration came from, for messages
    # "section.key" -> the file its secret was read from (`<key>_file`): read again when it changes (proxy/secrets.py)
    secret_files: Mapping[str, str] = field(default_factory=dict)
    # The proxy variables (HTTPS_PROXY, NO_PROXY, ...) of the environment load_config read: see egress().
    proxy_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[str]:
        """Every configured secret value (for the log redaction safety net), proxy credentials included."""
        values = [getattr(getattr(self, section), key) for section, key in SECRET_KEYS]
        variables = [value for name, value in self.proxy_env.items() if name not in NO_PROXY_VARIABLES]
        proxies = [self.upstream.proxy_url or "", self.auth.proxy_url or "", *variables]
        values += [s for url in proxies if url for s in credential_strings(url)]
        values.append(urlsplit(self.store.url).password or "" if self.store.url else "")
        values += self.inject.headers.values()  # [inject] headers: every value is a secret
        return [v for v in values if v]

    def egress(self, side: str) -> Egress:
        """How requests of ``side`` ("upstream" or "auth") leave: direct or through which proxy."""
        section: UpstreamConfig | AuthConfig = self.upstream if side == "upstream" else self.auth
        return Egress(section.proxy_url, self.proxy_env, f"{side}.proxy_url")


def _schema() -> dict[str, dict[str, tuple[type, Any]]]:
    """section -> key -> (type, default), read from the section dataclasses of :class:`Config`. The type is
    the TOML type of the default (a tuple is a TOML array, a mapping a table); ``float`` accepts integers too."""
    schema: dict[str, dict[str, tuple[type, Any]]] = {}
    for section in fields(Config):
        cls = section.default_factory
        if not is_dataclass(cls):  # `source`: not a section
            continue
        table: dict[str, tuple[type, Any]] = {}
        for key in fields(cls):
            if not key.metadata.get("key", True):
                continue
            default = key.default if key.default is not MISSING else key.default_factory()
            if isinstance(default, tuple):
                default = list(default)
            elif isinstance(default, Mapping):
                default = dict(default)
            table[key.name] = (key.metadata.get("type", type(default)), default)
        schema[section.name] = table
    return schema


SCHEMA = _schema()


# --- loading -------------------------------------------------------------------------------------


class _Raw:
    """Raw values per (section, key), each remembering where it came from."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Any] = {}
        self.origin: dict[tuple[str, str], str] = {}

    def set(self, section: str, key: str, value: Any, origin: str) -> None:
        self.values[(section, key)] = value
        self.origin[(section, key)] = origin

    def pop(self, section: str, key: str) -> None:
        self.values.pop((section, key), None)
        self.origin.pop((section, key), None)

    def has(self, section: str, key: str) -> bool:
        return (section, key) in self.values


def resolve_config_path(cli_path: str | None, env: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$OAUTH_SIDECAR_CONFIG``, else ``./config.toml`` if it exists, else None."""
    if cli_path:
        return Path(cli_path)
    if env.get(ENV_CONFIG_PATH):
        return Path(env[ENV_CONFIG_PATH])
    default = Path(DEFAULT_CONFIG_PATH)
    return default if default.is_file() else None


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML, optional), apply the environment, read secret files, validate."""
    env = os.environ if env is None else env
    raw = _Raw()
    source = "environment"
    if path is not None:
        source = str(path)
        _read_toml(Path(path), raw)
    _read_env(env, raw)
    return _build(raw, source, proxy_environment(env))


def config_from_mapping(data: Mapping[str, Any], source: str = "<built-in>") -> Config:
    """Build a Config from a TOML-shaped mapping (used by --dev and tests)."""
    raw = _Raw()
    _read_tables(data, raw, source)
    return _build(raw, source)


def _read_toml(path: Path, raw: _Raw) -> None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", "file not found", str(path)) from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read file ({exc.strerror})", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("--config", "file is not UTF-8 text", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"not valid TOML ({exc})", str(path)) from None
    _read_tables(data, raw, str(path))


def _read_tables(data: Mapping[str, Any], raw: _Raw, source: str) -> None:
    for section, table in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]", f"unknown section (known: {', '.join(SCHEMA)})", source)
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}]", "must be a table", source)
        for key, value in table.items():
            name, is_file = _key_name(section, key)
            if name is None:
                raise ConfigError(f"{section}.{key}", _unknown_key_hint(section), source)
            if is_file:
                if not isinstance(value, str):
                    raise ConfigError(f"{section}.{key}", "must be a file path (string)", source)
                value = _FileRef(value)
            if raw.has(section, name):  # both `password` and `password_file` in one table
                raise ConfigError(f"{section}.{key}", f"give either {name} or {name}_file, not both", source)
            raw.set(section, name, value, source)


class _FileRef:
    """A secret to be read from a file."""

    def __init__(self, path: str) -> None:
        self.path = path


def _key_name(section: str, key: str) -> tuple[str | None, bool]:
    if key in SCHEMA[section]:
        return key, False
    if key.endswith("_file") and (section, key[: -len("_file")]) in SECRET_KEYS:
        return key[: -len("_file")], True
    return None, False


def _unknown_key_hint(section: str) -> str:
    return f"unknown key (known in [{section}]: {', '.join(SCHEMA[section])})"


def _read_env(env: Mapping[str, str], raw: _Raw) -> None:
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG_PATH:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        origin = f"environment variable {var}"
        if section not in SCHEMA or not key:
            raise ConfigError(var, f"unknown variable (sections: {', '.join(SCHEMA)})", "environment")
        name, is_file = _key_name(section, key)
        if name is None:
            raise ConfigError(var, _unknown_key_hint(section), "environment")
        raw.pop(section, name)
        if is_file:
            raw.set(section, name, _FileRef(text), origin)
        else:
            value = text.strip() if (section, name) in AUTO_KEYS and text.strip() == "auto" else None
            raw.set(section, name, value or _parse_env_value(var, text, SCHEMA[section][name][0]), origin)


def _parse_env_value(var: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is list:
            stripped = text.strip()
            if stripped.startswith("["):
                value = json.loads(stripped)
                if not isinstance(value, list):
                    raise ValueError
                return value
            return [part.strip() for part in stripped.split(",") if part.strip()]
        if kind is dict:
            value = json.loads(text) if text.strip() else {}
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ValueError:
        shapes = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            list: "a comma-separated list or a JSON array",
            dict: "a JSON object",
        }
        raise ConfigError(var, f"must be {shapes[kind]}", "environment") from None
    return text


def read_secret(path: str, *, regular_only: bool = False) -> str:
    """The secret in the file at ``path``, trailing newlines stripped; at most MAX_SECRET_BYTES.

    Raises OSError, or ValueError saying why the file holds no secret (too large, not UTF-8). With
    ``regular_only`` (a re-read while serving, proxy/secrets.py) anything but a regular file is refused
    without waiting: a FIFO opened and read there would block the event loop.
    """
    if regular_only and not stat.S_ISREG(os.stat(path).st_mode):  # not even opened: a FIFO's writer would wake
        raise ValueError("not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (getattr(os, "O_NONBLOCK", 0) if regular_only else 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as file:
        if regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = file.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"larger than {MAX_SECRET_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def check_secret(key: str, value: str) -> str | None:
    """Why ``value`` cannot be the secret ``key`` ("auth.code_verifier"), or None; never quotes the value."""
    if key == "auth.code_verifier":
        # RFC 7636 §4.1
        if not 43 <= len(value) <= 128 or not all(c.isascii() and (c.isalnum() or c in "-._~") for c in value):
            return "must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_', '~'"
    if key.startswith("inject.headers."):
        return header_value_problem(value)
    return None


def header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a static header's value, or None. Visible ASCII, space and tab only: no CR,
    LF or NUL could end the line or forge another header."""
    if not value.isascii() or any((c < " " and c != "\t") or c == "\x7f" for c in value):
        return "must be ASCII text without control characters"
    return None


def _read_secret_file(ref: _FileRef, section: str, key: str, origin: str) -> str:
    try:
        value = read_secret(ref.path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{section}.{key}_file", f"cannot read {ref.path!r} ({reason})", origin) from None
    except ValueError as exc:
        raise ConfigError(f"{section}.{key}_file", f"{ref.path!r} is {exc}", origin) from None
    if not value and (section, key) == ("access", "api_key"):
        # An empty key would let every client in: a Secret mounted before its value was filled in.
        raise ConfigError(
            f"{section}.{key}_file", f"{ref.path!r} is empty (remove access.api_key_file to require no key)", origin
        )
    return value


def _typed(raw: _Raw, section: str, key: str) -> Any:
    """The value of section.key, type-checked, or its default."""
    kind, default = SCHEMA[section][key]
    if not raw.has(section, key):
        return default
    value = raw.values[(section, key)]
    origin = raw.origin[(section, key)]
    if isinstance(value, _FileRef):
        return _read_secret_file(value, section, key, origin)
    if (section, key) in AUTO_KEYS and value == "auto":
        return auto_workers()
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = {
            str: "a string",
            int: "an integer",
            float: "a number",
            bool: "true or false",
            list: "a list",
            dict: "a table",
        }
        want = names[kind] + (' or "auto"' if (section, key) in AUTO_KEYS else "")
        raise ConfigError(f"{section}.{key}", f"must be {want}, got {type(value).__name__}", origin)
    if kind is float and not math.isfinite(value):  # TOML has inf and nan; no duration or margin is either
        raise ConfigError(f"{section}.{key}", f"must be a finite number, got {value}", origin)
    return value


def _build(raw: _Raw, source: str, proxy_env: Mapping[str, str] | None = None) -> Config:
    values: dict[str, dict[str, Any]] = {s: {k: _typed(raw, s, k) for k in keys} for s, keys in SCHEMA.items()}

    def where(section: str, key: str) -> str:
        return raw.origin.get((section, key), source)

    def fail(section: str, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{section}.{key}", problem, where(section, key))

    auth = values["auth"]
    preset = PRESETS.get(auth["provider"])
    if preset is None:
        raise fail("auth", "provider", f"unknown provider {auth['provider']!r} (known: {', '.join(PRESETS)})")
    # The preset fills whatever the user did not set; an issuer the user gives replaces the preset's
    # token URL (its endpoints are then found by OpenID discovery).
    for key, value in preset.auth.items():
        if not raw.has("auth", key) and not (key == "token_url" and raw.has("auth", "issuer")):
            auth[key] = value
    if not raw.has("upstream", "url") and preset.upstream_url:
        values["upstream"]["url"] = preset.upstream_url
    if not raw.has("inject", "header"):
        values["inject"]["header"] = preset.inject_header
    if not raw.has("inject", "value"):
        values["inject"]["value"] = preset.inject_value
    auth["auth_string"] = preset.auth_string

    _validate(values, preset, raw, fail)
    upstream_url = values["upstream"]["url"].rstrip("/")
    values["upstream"]["url"] = upstream_url
    if not auth["token_url"] and not auth["issuer"] and preset.token_path:
        auth["token_url"] = upstream_url + preset.token_path
    if preset.keycloak and auth["token_url"].endswith("/token"):
        base = auth["token_url"][: -len("/token")]
        auth["logout_url"] = auth["logout_url"] or base + "/logout"
        auth["revoke_url"] = auth["revoke_url"] or base + "/revoke"

    access = values["access"]
    config = Config(
        listen=ListenConfig(
            host=values["listen"]["host"],
            port=values["listen"]["port"],
            allowed_hosts=tuple(h.lower() for h in values["listen"]["allowed_hosts"]),
            shutdown_grace_s=values["listen"]["shutdown_grace_s"],
            max_connections=values["listen"]["max_connections"],
            idle_timeout_s=values["listen"]["idle_timeout_s"],
            min_body_rate=values["listen"]["min_body_rate"],
            workers=values["listen"]["workers"],
        ),
        upstream=UpstreamConfig(**values["upstream"]),
        auth=AuthConfig(**{**auth, "extra": MappingProxyType({str(k): v for k, v in auth["extra"].items()})}),
        inject=InjectConfig(
            header=values["inject"]["header"],
            value=values["inject"]["value"],
            headers=MappingProxyType(values["inject"]["headers"]),
            headers_file=MappingProxyType(values["inject"]["headers_file"]),
        ),
        access=AccessConfig(
            allow_methods=tuple(m.upper() for m in access["allow_methods"]),
            allow_paths=tuple(access["allow_paths"]),
            api_key=access["api_key"],
            allow_origins=tuple(o.rstrip("/").lower() for o in access["allow_origins"]),
            allow_clients=tuple(ipaddress.ip_network(c, strict=False) for c in access["allow_clients"]),
        ),
        log=LogConfig(**values["log"]),
        store=StoreConfig(**{**values["store"], "sentinels": tuple(values["store"]["sentinels"])}),
        source=source,
        secret_files=MappingProxyType(
            {f"{s}.{k}": v.path for (s, k), v in raw.values.items() if isinstance(v, _FileRef)}
            | {f"inject.headers.{name}": path for name, path in values["inject"]["headers_file"].items()}
        ),
        proxy_env=MappingProxyType(dict(proxy_env or {})),
    )
    _check_egress(config, where)
    return config


def _check_egress(config: Config, where: Any) -> None:
    """Each side's proxy setting, for each URL the side is configured with: a ConfigError naming the key
    (``upstream.proxy_url``) or the variable (``HTTPS_PROXY``). A variable no configured URL uses is not
    looked at (an ``http_proxy`` pointing at a SOCKS proxy, for other programs, does no harm)."""
    auth = config.auth
    for side, urls in (
        ("upstream", (config.upstream.url,)),
        ("auth", (auth.token_url, auth.issuer, auth.revoke_url, auth.logout_url)),
    ):
        egress = config.egress(side)
        for url in urls:
            if not url:
                continue
            try:
                egress.for_url(url)
            except EgressError as exc:
                origin = where(side, "proxy_url") if exc.key.endswith(".proxy_url") else "environment"
                raise ConfigError(exc.key, exc.problem, origin) from None


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:  # not *.localhost: whether those reach loopback is up to the resolver
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str | None:
    """Why ``url`` is not acceptable as a token endpoint or upstream, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    # First, so that the messages below, which quote the URL, never quote a password.
    if parts.username or parts.password:
        return "must not contain credentials; use the [auth] keys"
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"not a valid URL: {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an https:// URL, got {url!r}"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return f"http:// is only allowed for a loopback host; use https:// ({url!r})"
    if parts.query or parts.fragment:
        return "must not contain a query string or fragment"
    return None


def _validate(values: dict[str, dict[str, Any]], preset: Preset, raw: _Raw, fail: Any) -> None:
    listen, upstream, auth = values["listen"], values["upstream"], values["auth"]
    inject, access, log = values["inject"], values["access"], values["log"]

    if not 0 <= listen["port"] <= 65535:
        raise fail("listen", "port", "must be between 0 and 65535")
    if not listen["host"]:
        raise fail("listen", "host", "must not be empty")
    for key in ("shutdown_grace_s",):
        if listen[key] < 0:
            raise fail("listen", key, "must not be negative")
    if listen["max_connections"] < 1:
        raise fail("listen", "max_connections", "must be at least 1")
    if listen["idle_timeout_s"] <= 0:
        raise fail("listen", "idle_timeout_s", "must be greater than 0")
    if listen["min_body_rate"] < 0:
        raise fail("listen", "min_body_rate", "must not be negative (0 turns the check off)")
    _check_strings(listen, "listen", "allowed_hosts", fail)
    _validate_workers(listen["workers"], auth, fail)

    if not upstream["url"]:
        raise fail("upstream", "url", "required: the API every request is forwarded to")
    if problem := check_url(upstream["url"]):
        raise fail("upstream", "url", problem)
    for key in ("timeout_s", "connect_timeout_s"):
        if upstream[key] <= 0:
            raise fail("upstream", key, "must be greater than 0")
    if upstream["pool_size"] < 1:
        raise fail("upstream", "pool_size", "must be at least 1")
    if upstream["replay_limit_bytes"] < 0:
        raise fail("upstream", "replay_limit_bytes", "must not be negative")
    if upstream["ca_file"] and not Path(upstream["ca_file"]).is_file():
        raise fail("upstream", "ca_file", f"no such file: {upstream['ca_file']!r}")

    grant = auth["grant_type"]
    if grant == "implicit":
        raise fail(
            "auth",
            "grant_type",
            "implicit is not supported: it is a browser-only flow that returns the token in a URL "
            "and gives no refresh token; use authorization_code, password or client_credentials",
        )
    if grant not in GRANT_TYPES:
        raise fail("auth", "grant_type", f"must be one of {', '.join(GRANT_TYPES)}, got {grant!r}")
    if auth["body"] not in ("form", "json"):
        raise fail("auth", "body", f"must be form or json, got {auth['body']!r}")
    if auth["client_auth"] not in CLIENT_AUTH_METHODS:
        raise fail(
            "auth", "client_auth", f"must be one of {', '.join(CLIENT_AUTH_METHODS)}, got {auth['client_auth']!r}"
        )
    for key in ("token_url", "issuer", "revoke_url", "logout_url"):
        if auth[key] and (problem := check_url(auth[key])):
            raise fail("auth", key, problem)
    if raw.has("auth", "token_url") and raw.has("auth", "issuer"):
        raise fail("auth", "issuer", "give either token_url or issuer (OpenID discovery), not both")
    if not auth["token_url"] and not preset.token_path and not auth["issuer"]:
        raise fail("auth", "token_url", f"required for provider {preset.name!r} (give token_url or issuer)")
    if auth["refresh_margin_s"] < 0:
        raise fail("auth", "refresh_margin_s", "must not be negative")
    for key in ("default_lifetime_s", "timeout_s"):
        if auth[key] <= 0:
            raise fail("auth", key, "must be greater than 0")
    for name, value in auth["extra"].items():
        if not isinstance(value, str | int | float | bool):
            raise fail("auth", "extra", f"value of {name!r} must be a string or number")
    if "code_verifier" in auth["extra"]:  # a PKCE verifier is a secret, sent with the code exchange only
        if auth["code_verifier"]:
            raise fail("auth", "extra", "give either auth.code_verifier or extra.code_verifier, not both")
        auth["code_verifier"] = str(auth["extra"]["code_verifier"])
        auth["extra"] = {k: v for k, v in auth["extra"].items() if k != "code_verifier"}
    if auth["code_verifier"]:
        if grant != "authorization_code":
            raise fail("auth", "code_verifier", "is only sent with grant_type authorization_code")
        if problem := check_secret("auth.code_verifier", auth["code_verifier"]):
            raise fail("auth", "code_verifier", problem)

    needs = {
        "password": ("username", "password"),
        "client_credentials": ("client_id", "client_secret"),  # RFC 6749 §4.4: a confidential client
        "refresh_token": ("refresh_token",),
        "authorization_code": ("code",),
    }[grant]
    if auth["client_auth"] in ("private_key_jwt", "tls_client_auth"):  # the client proves itself by key
        needs = tuple(key for key in needs if key != "client_secret")
    if preset.auth_string:
        needs = (*needs, "username", "password")
    for key in (*needs, *preset.required):
        if not auth.get(key):
            hint = preset.required.get(key, "")
            problem = f"required for grant_type {grant}" + (f": {hint}" if hint else "")
            if key in preset.required and key not in needs:
                problem = f"required for provider {preset.name}: {hint}"
            if (("auth", key)) in SECRET_KEYS:
                problem += f" (or {key}_file, or OAUTH_SIDECAR_AUTH_{key.upper()}[_FILE])"
            raise fail("auth", key, problem)

    _validate_client_keys(upstream, auth, fail)

    if "{token}" not in inject["value"]:
        raise fail("inject", "value", "must contain {token}")
    if not inject["header"] or any(c in inject["header"] for c in " :\r\n\t"):
        raise fail("inject", "header", f"not a valid header name: {inject['header']!r}")
    inject["headers"] = _static_headers(inject, fail)

    _check_strings(access, "access", "allow_methods", fail)
    _check_strings(access, "access", "allow_paths", fail)
    _check_strings(access, "access", "allow_origins", fail)
    _check_strings(access, "access", "allow_clients", fail)
    for path in access["allow_paths"]:
        if not path.startswith("/"):
            raise fail("access", "allow_paths", f"each entry must start with '/', got {path!r}")
    for origin in access["allow_origins"]:
        if origin == "*":
            raise fail("access", "allow_origins", "'*' is not allowed: list each origin, e.g. https://app.example")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise fail("access", "allow_origins", f"each entry must look like https://host[:port], got {origin!r}")
    for cidr in access["allow_clients"]:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise fail("access", "allow_clients", f"not an IP address or CIDR: {cidr!r}") from None
    if log["level"].lower() not in LOG_LEVELS:
        raise fail("log", "level", f"must be one of {', '.join(LOG_LEVELS)}, got {log['level']!r}")
    log["level"] = log["level"].lower()
    if log["format"] not in ("text", "json"):
        raise fail("log", "format", f"must be text or json, got {log['format']!r}")
    _validate_store(values["store"], auth, fail)


def auto_workers() -> int:
    """``listen.workers = "auto"``: one worker per CPU this process may use."""
    if not WORKERS_SUPPORTED:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _validate_workers(workers: int, auth: dict[str, Any], fail: Any) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise fail("listen", "workers", f'must be between 1 and {MAX_WORKERS}, or "auto" (one per CPU)')
    if workers > 1 and not WORKERS_SUPPORTED:
        raise fail(
            "listen",
            "workers",
            f"more than 1 needs SO_REUSEPORT load balancing and fork(), which this platform ({sys.platform}) "
            "lacks (Linux has both): run one process per port instead",
        )
    if workers > 1 and auth["revoke_on_shutdown"]:
        raise fail(
            "auth",
            "revoke_on_shutdown",
            "cannot be combined with listen.workers > 1: the workers share one session, and the first worker "
            "to stop would end it for the others",
        )


def _validate_store(store: dict[str, Any], auth: dict[str, Any], fail: Any) -> None:
    kind = store["kind"]
    if kind not in STORE_KINDS:
        raise fail("store", "kind", f"must be one of {', '.join(STORE_KINDS)}, got {kind!r}")
    if kind == "memory":
        return
    if kind == "file" and not store["path"]:
        raise fail("store", "path", "required for kind file: the store file, e.g. /var/lib/oauth-sidecar/token")
    if kind == "file" and not Path(store["path"]).parent.is_dir():
        raise fail("store", "path", f"the directory of {store['path']!r} does not exist")
    if kind == "redis":
        url = store["url"]
        if not url:
            raise fail("store", "url", "required for kind redis, e.g. rediss://redis.internal:6379/0")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise fail("store", "url", "not a valid URL") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise fail("store", "url", f"must be a redis://, rediss:// or unix:// URL, got scheme {parts.scheme!r}")
        if store["mode"] not in STORE_MODES:
            raise fail("store", "mode", f"must be one of {', '.join(STORE_MODES)}, got {store['mode']!r}")
        _check_strings(store, "store", "sentinels", fail)
        if store["mode"] == "sentinel" and not store["sentinels"]:
            raise fail("store", "sentinels", "required for mode sentinel: host:port of each sentinel")
        for sentinel in store["sentinels"]:  # host:port (the port defaults to 26379)
            host, colon, port = sentinel.rpartition(":")
            if not colon:
                host, port = sentinel, "26379"
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise fail("store", "sentinels", f"each must be host:port, got {sentinel!r}")
        from redis.asyncio.connection import parse_url  # redis is only needed for kind redis

        try:
            parse_url(url)
        except ValueError:  # redis-py's message is not quoted: the URL may carry a password
            raise fail(
                "store", "url", "redis does not accept it (check its database number and query parameters)"
            ) from None
        if store["ca_file"] and not Path(store["ca_file"]).is_file():
            raise fail("store", "ca_file", f"no such file: {store['ca_file']!r}")
    if len(store["key"]) < MIN_STORE_KEY_CHARS:
        problem = "required for kind file and redis" if not store["key"] else "too short"
        raise fail(
            "store",
            "key",
            f"{problem}: at least {MIN_STORE_KEY_CHARS} characters (e.g. `openssl rand -base64 32`), "
            "or key_file, or OAUTH_SIDECAR_STORE_KEY[_FILE]",
        )
    if store["lease_s"] < 0:
        raise fail("store", "lease_s", "must not be negative (0: auth.timeout_s + 5 s)")
    if auth["revoke_on_shutdown"]:
        raise fail(
            "auth",
            "revoke_on_shutdown",
            f"cannot be combined with store.kind = {kind!r}: ending the session at shutdown would end it for "
            "every process sharing the store",
        )


def _validate_client_keys(upstream: dict[str, Any], auth: dict[str, Any], fail: Any) -> None:
    """Client authentication by key (proxy/client_auth.py): every key and certificate loads now, so a bad
    one stops the start (exit 2) instead of failing each login. Messages name files, never their content."""
    method = auth["client_auth"]
    if method in (*JWT_METHODS, "tls_client_auth") and not auth["client_id"]:
        raise fail("auth", "client_id", f"required for client_auth {method}")
    if method == "client_secret_jwt":
        if not auth["client_secret"]:
            raise fail("auth", "client_secret", "required for client_auth client_secret_jwt (it signs the assertion)")
        if len(auth["client_secret"].encode()) < MIN_HMAC_BYTES:
            raise fail(
                "auth", "client_secret", f"must be at least {MIN_HMAC_BYTES} bytes to sign HS256 (RFC 7518 §3.2)"
            )
        if auth["client_key_alg"] not in ("", "HS256"):
            raise fail("auth", "client_key_alg", f"client_secret_jwt signs HS256, got {auth['client_key_alg']!r}")
    if any(not c.isprintable() or c.isspace() for c in auth["assertion_audience"]):
        raise fail("auth", "assertion_audience", "must be a URL or identifier without spaces or control characters")
    if method == "private_key_jwt" and not auth["client_key_file"]:
        raise fail(
            "auth", "client_key_file", "required for client_auth private_key_jwt: the PEM private key that signs"
        )
    if method == "tls_client_auth" and not auth["client_cert_file"]:
        raise fail("auth", "client_cert_file", "required for client_auth tls_client_auth: the PEM client certificate")
    if method not in JWT_METHODS:
        for key in ("client_key_alg", "client_key_id", "assertion_audience"):
            if auth[key]:
                raise fail("auth", key, "only used with client_auth private_key_jwt or client_secret_jwt")
    if auth["client_key_file"] and method != "private_key_jwt" and not auth["client_cert_file"]:
        raise fail(
            "auth", "client_key_file", "only used with client_auth private_key_jwt or with auth.client_cert_file"
        )
    if method == "private_key_jwt":
        try:
            load_signing_key(auth["client_key_file"], auth["client_key_alg"])
        except KeyFileError as exc:
            raise fail("auth", "client_key_file", str(exc)) from None
        except ValueError as exc:
            raise fail("auth", "client_key_alg", str(exc)) from None
    for section, table in (("auth", auth), ("upstream", upstream)):
        if table["client_key_file"] and not table["client_cert_file"] and section == "upstream":
            raise fail(
                section, "client_cert_file", "required with upstream.client_key_file: the certificate to present"
            )
        if not table["client_cert_file"]:
            continue
        try:
            check_client_cert(table["client_cert_file"], table["client_key_file"])
            if section == "auth" and method == "private_key_jwt":  # its thumbprints go into the assertions
                certificate_thumbprints(table["client_cert_file"])
        except KeyFileError as exc:
            raise fail(section, "client_cert_file" if exc.which == "cert" else "client_key_file", str(exc)) from None
    if upstream["client_cert_file"] and not upstream["url"].startswith("https://"):
        raise fail("upstream", "client_cert_file", "only used with an https:// upstream.url")


def _static_headers(inject: dict[str, Any], fail: Any) -> dict[str, str]:
    """``inject.headers`` with the values of ``inject.headers_file`` read in, each name and value checked.

    A value is never quoted in a message (they are secrets); the header's name is."""
    token_header = inject["header"].lower()
    token_twins = {token_header, token_header.replace("_", "-"), token_header.replace("-", "_")}
    merged: dict[str, str] = {}
    seen: set[str] = set()
    for key in ("headers", "headers_file"):
        for name, value in inject[key].items():
            if not name or not set(name) <= TOKEN_CHARS:
                raise fail("inject", key, f"not a valid header name: {name!r}")
            lowered = name.lower()
            if lowered in RESERVED_STATIC_HEADERS:
                raise fail("inject", key, f"{name!r} cannot be set: the proxy writes or drops it itself")
            if lowered in token_twins:
                raise fail("inject", key, f"{name!r} is the token's header (inject.header)")
            if lowered in seen:
                raise fail("inject", key, f"header {name!r} is given twice (names are case-insensitive)")
            seen.add(lowered)
            if not isinstance(value, str):
                shape = "a file path" if key == "headers_file" else "a string"
                raise fail("inject", key, f"the value of {name!r} must be {shape}")
            if key == "headers_file":
                path = value
                try:
                    value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
                except OSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    raise fail("inject", key, f"cannot read {path!r} for {name!r} ({reason})") from None
                except UnicodeDecodeError:
                    raise fail("inject", key, f"{path!r} (for {name!r}) is not UTF-8 text") from None
            if problem := header_value_problem(value):
                raise fail("inject", key, f"the value of {name!r} {problem}")
            merged[name] = value
    return merged


def _check_strings(table: dict[str, Any], section: str, key: str, fail: Any) -> None:
    if not all(isinstance(item, str) for item in table[key]):
        raise fail(section, key, "must be a list of strings")
