"""Configuration: TOML, then the environment, then *_file secrets, into frozen objects; every mistake is one line."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import cli
from proxy.config import SCHEMA, load_config
from proxy.errors import ConfigError
from proxy.providers import WE360_TOKEN_URL
from tests.fakes.sidecar import clean_env

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pw-Zq81-not-real"  # a fake secret; it must never appear in a message


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


WE360_MINIMAL = """
[auth]
provider = "we360"
client_id = "cust-123"
username = "me@example.com"
"""


def test_toml_then_environment_then_secret_files(tmp_path):
    """The environment overrides TOML; *_file secrets are read with trailing newlines stripped."""
    write(tmp_path, f"{PASSWORD}\n\n", "password")
    write(tmp_path, "client-secret-value\r\n", "client_secret")
    path = write(
        tmp_path,
        f"""
[listen]
port = 9000
allowed_hosts = ["sidecar"]
[upstream]
url = "https://api.example.com/"
timeout_s = 60
[auth]
provider = "keycloak"
token_url = "https://idp.example.com/realms/r/protocol/openid-connect/token"
client_id = "from-toml"
username = "me"
password_file = "{tmp_path / "password"}"
scope = "from-toml"
[log]
level = "INFO"
""",
    )
    env = {
        "OAUTH_SIDECAR_LISTEN_PORT": "9100",
        "OAUTH_SIDECAR_AUTH_CLIENT_ID": "from-env",
        "OAUTH_SIDECAR_AUTH_CLIENT_SECRET_FILE": str(tmp_path / "client_secret"),
        "OAUTH_SIDECAR_ACCESS_ALLOW_METHODS": "get, head",
        "OAUTH_SIDECAR_AUTH_REVOKE_ON_SHUTDOWN": "true",
        "UNRELATED": "ignored",
    }
    config = load_config(path, env)
    assert config.listen.port == 9100
    assert config.listen.allowed_hosts == ("sidecar",)
    assert config.upstream.url == "https://api.example.com"
    assert config.upstream.timeout_s == 60.0 and isinstance(config.upstream.timeout_s, float)
    assert config.auth.client_id == "from-env"
    assert config.auth.scope == "from-toml"
    assert config.auth.password == PASSWORD
    assert config.auth.client_secret == "client-secret-value"
    assert config.auth.revoke_on_shutdown is True
    assert config.access.allow_methods == ("GET", "HEAD")
    assert config.log.level == "info"
    assert config.source == str(path)
    assert PASSWORD not in repr(config)
    assert "client-secret-value" not in repr(config)


def test_environment_secret_replaces_a_toml_secret_file(tmp_path):
    """OAUTH_SIDECAR_AUTH_PASSWORD wins over password_file in the TOML (whose file is then not read)."""
    path = write(tmp_path, WE360_MINIMAL + f'password_file = "{tmp_path / "missing"}"\n')
    config = load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    assert config.auth.password == PASSWORD


def test_configuration_is_frozen(tmp_path):
    """Nothing in a loaded configuration can be changed afterwards."""
    path = write(tmp_path, WE360_MINIMAL + 'extra = { audience = "api" }\n')
    config = load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.auth.password = "changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = config.listen  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.auth.extra["audience"] = "other"  # type: ignore[index]
    assert isinstance(config.listen.allowed_hosts, tuple)
    assert dict(config.auth.extra) == {"audience": "api"}


def test_we360_preset_fills_endpoint_grant_body_and_upstream(tmp_path):
    """provider = we360 needs only the Customer ID, the user name and a password."""
    config = load_config(write(tmp_path, WE360_MINIMAL), {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    assert config.auth.token_url == WE360_TOKEN_URL
    assert config.auth.token_url == "https://auth.in.we360.ai/realms/ind-prod/protocol/openid-connect/token"
    assert config.auth.grant_type == "password"
    assert config.auth.body == "form"
    assert config.upstream.url == "https://api.in.we360.ai"
    assert config.inject.header == "Authorization"
    assert config.inject.value == "Bearer {token}"
    assert config.auth.client_id == "cust-123"


def test_we360_preset_values_can_be_overridden(tmp_path):
    """A key the user sets wins over the preset's default."""
    path = write(tmp_path, WE360_MINIMAL + '[upstream]\nurl = "http://127.0.0.1:9999"\n')
    config = load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    assert config.upstream.url == "http://127.0.0.1:9999"
    assert config.auth.token_url == WE360_TOKEN_URL


def test_example_config_loads():
    """config.example.toml is a working we360 configuration once a password is given."""
    config = load_config(REPO / "config.example.toml", {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    assert config.auth.provider == "we360"
    assert config.auth.token_url == WE360_TOKEN_URL
    assert config.upstream.url == "https://api.in.we360.ai"
    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 8360
    assert config.auth.password == PASSWORD


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://127.5.6.7", "http://localhost:1/x", "http://[::1]:9000", "https://a.b"]
)
def test_http_is_allowed_for_loopback(tmp_path, url):
    """Plain http:// is fine for loopback hosts; anything may use https://."""
    path = write(tmp_path, WE360_MINIMAL + f'[upstream]\nurl = "{url}"\n')
    assert load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD}).upstream.url == url


# (TOML added to a valid we360 config, key the message must name, words it must contain)
BAD_TOML = {
    "unknown key": ('passwd = "x"\n', "auth.passwd", "unknown key"),
    "unknown section": ("[proxy]\nport = 1\n", "[proxy]", "unknown section"),
    "wrong type": ('[listen]\nport = "8360"\n', "listen.port", "must be an integer, got str"),
    "bool for int": ("[listen]\nport = true\n", "listen.port", "must be an integer"),
    "string for list": ('[access]\nallow_paths = "/v1/"\n', "access.allow_paths", "must be a list"),
    "number for string": ("[log]\nlevel = 10\n", "log.level", "must be a string"),
    "port out of range": ("[listen]\nport = 70000\n", "listen.port", "between 0 and 65535"),
    "nan timeout": ("[upstream]\ntimeout_s = nan\n", "upstream.timeout_s", "must be a finite number, got nan"),
    "infinite margin": ("refresh_margin_s = inf\n", "auth.refresh_margin_s", "must be a finite number"),
    "idle timeout 0": ("[listen]\nidle_timeout_s = 0\n", "listen.idle_timeout_s", "must be greater than 0"),
    "http upstream": ('[upstream]\nurl = "http://api.example.com"\n', "upstream.url", "http:// is only allowed"),
    "http token url": (
        'token_url = "http://auth.example.com/realms/r/protocol/openid-connect/token"\n',
        "auth.token_url",
        "http:// is only allowed for a loopback host",
    ),
    "localhost lookalike": ('[upstream]\nurl = "http://localhost.evil.example"\n', "upstream.url", "loopback"),
    "localhost subdomain": ('[upstream]\nurl = "http://api.localhost"\n', "upstream.url", "loopback"),
    "implicit grant": (
        'grant_type = "implicit"\n',
        "auth.grant_type",
        "implicit is not supported: it is a browser-only flow",
    ),
    "unknown grant": ('grant_type = "device_code"\n', "auth.grant_type", "must be one of"),
    "secret twice": (f'password = "{PASSWORD}"\npassword_file = "/x"\n', "auth.password_file", "not both"),
    "unreadable secret file": (
        'client_secret_file = "/nonexistent/secret"\n',
        "auth.client_secret_file",
        "cannot read",
    ),
    "bad body": ('body = "xml"\n', "auth.body", "must be form or json"),
    "token missing": ('[inject]\nvalue = "Bearer"\n', "inject.value", "{token}"),
}


@pytest.mark.parametrize(("extra", "key", "words"), BAD_TOML.values(), ids=BAD_TOML.keys())
def test_bad_toml_is_one_line_naming_file_and_key(tmp_path, extra, key, words):
    """Each mistake raises one ConfigError: one line, naming the file, the key and the problem."""
    # Keys for [auth] go right after the minimal [auth] table; others bring their own table header.
    path = write(tmp_path, WE360_MINIMAL + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ")
    assert words in message
    assert info.value.key == key
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        ('[auth]\nprovider = "we360"\nusername = "me@example.com"\n', "auth.client_id", "Customer ID"),
        ('[auth]\nprovider = "we360"\nclient_id = "c"\n', "auth.username", "required"),
        (WE360_MINIMAL, "auth.password", "OAUTH_SIDECAR_AUTH_PASSWORD"),
        ('[auth]\nprovider = "keycloak"\nusername = "u"\n', "upstream.url", "required"),
        (
            '[upstream]\nurl = "https://api.example.com"\n[auth]\nprovider = "oauth2"\n'
            'token_url = "https://auth.example.com/token"\ngrant_type = "client_credentials"\nclient_id = "c"\n',
            "auth.client_secret",
            "required for grant_type client_credentials",
        ),
        ('[auth]\nprovider = "nope"\n', "auth.provider", "unknown provider"),
    ],
)
def test_missing_required_keys(tmp_path, toml, key, words):
    """A required key that is missing is named, with a hint where it comes from."""
    path = write(tmp_path, toml)
    env = {} if key == "auth.password" else {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD}
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("OAUTH_SIDECAR_AUTH_PASSWRD", "x", "unknown key"),
        ("OAUTH_SIDECAR_PROXY_PORT", "1", "unknown variable"),
        ("OAUTH_SIDECAR_LISTEN_PORT", "eighty", "must be an integer"),
        ("OAUTH_SIDECAR_AUTH_REVOKE_ON_SHUTDOWN", "maybe", "true or false"),
        ("OAUTH_SIDECAR_AUTH_EXTRA", "[1]", "a JSON object"),
    ],
)
def test_bad_environment_variable_names_the_variable(tmp_path, var, value, words):
    """An unknown or ill-typed OAUTH_SIDECAR_* variable is an error naming the variable."""
    path = write(tmp_path, WE360_MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD, var: value})
    message = str(info.value)
    assert message.startswith(f"environment: {var}: ")
    assert words in message
    assert "\n" not in message


def test_value_from_environment_is_blamed_on_the_variable(tmp_path):
    """A bad value that came from the environment names that variable as its source, not the file."""
    path = write(tmp_path, WE360_MINIMAL)
    env = {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD, "OAUTH_SIDECAR_UPSTREAM_URL": "http://api.example.com"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert str(info.value).startswith("environment variable OAUTH_SIDECAR_UPSTREAM_URL: upstream.url: http://")

    env = {"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD, "OAUTH_SIDECAR_LISTEN_IDLE_TIMEOUT_S": "inf"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert str(info.value) == (
        "environment variable OAUTH_SIDECAR_LISTEN_IDLE_TIMEOUT_S: "
        "listen.idle_timeout_s: must be a finite number, got inf"
    )


@pytest.mark.parametrize(
    "url",
    [
        f"http://me:{PASSWORD}@api.example.com",
        f"https://me:{PASSWORD}@api.example.com:99999",
        f"ftp://me:{PASSWORD}@api.example.com",
    ],
)
def test_url_with_credentials_is_refused_without_quoting_them(tmp_path, url):
    """A URL carrying user:password is refused, and the message does not repeat the password."""
    path = write(tmp_path, WE360_MINIMAL + f'[upstream]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {"OAUTH_SIDECAR_AUTH_PASSWORD": "x"})
    assert "must not contain credentials" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_environment_alone_is_a_configuration(tmp_path):
    """With no file at all, the environment is enough; the source says so."""
    env = {
        "OAUTH_SIDECAR_AUTH_CLIENT_ID": "cust-1",
        "OAUTH_SIDECAR_AUTH_USERNAME": "me@example.com",
        "OAUTH_SIDECAR_AUTH_PASSWORD_FILE": str(write(tmp_path, PASSWORD + "\n", "pw")),
    }
    config = load_config(None, env)
    assert config.source == "environment"
    assert config.auth.password == PASSWORD
    assert config.upstream.url == "https://api.in.we360.ai"


# --- through the command line --------------------------------------------------------------------


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    """`python -m proxy --config bad.toml` prints one line naming file and key, no traceback, and exits 2."""
    path = write(tmp_path, WE360_MINIMAL + '[listen]\nport = "8360"\n')
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(OAUTH_SIDECAR_AUTH_PASSWORD=PASSWORD),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert "listen.port" in lines[0]
    assert "must be an integer" in lines[0]
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize(
    ("argv_tail", "toml", "words"),
    [
        ([], WE360_MINIMAL + 'grant_type = "implicit"\n', "auth.grant_type: implicit is not supported"),
        ([], "[auth\n", "not valid TOML"),
        ([], b"\xff\xfe[auth]", "not UTF-8"),
        (["--port", "70000"], WE360_MINIMAL, "--port: must be between 0 and 65535"),
    ],
    ids=["implicit", "toml-syntax", "not-utf8", "bad-port"],
)
def test_cli_main_returns_2_for_config_errors(tmp_path, capsys, argv_tail, toml, words):
    """cli.main() returns exit code 2 and writes exactly one line to stderr."""
    path = tmp_path / "bad.toml"
    path.write_bytes(toml if isinstance(toml, bytes) else toml.encode())
    code = cli.main(["--config", str(path), *argv_tail], env={"OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD})
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert words in err
    assert "Traceback" not in err


def test_cli_missing_config_file_exits_2(tmp_path, capsys):
    """--config naming a file that does not exist is a configuration error, not a crash."""
    missing = tmp_path / "nope.toml"
    assert cli.main(["--config", str(missing)], env={}) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"oauth-sidecar: configuration error: {missing}: --config: file not found"


def test_cli_reads_config_path_from_environment(tmp_path, capsys):
    """Without --config, $OAUTH_SIDECAR_CONFIG names the file (here a bad one, to stop before serving)."""
    path = write(tmp_path, WE360_MINIMAL + "bogus = 1\n")
    assert cli.main([], env={"OAUTH_SIDECAR_CONFIG": str(path), "OAUTH_SIDECAR_AUTH_PASSWORD": PASSWORD}) == 2
    assert f"{path}: auth.bogus: unknown key" in capsys.readouterr().err


def _readme_default(value: object) -> str:
    """A SCHEMA default as the README's configuration table writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | dict):
        return json.dumps(value)
    return f"{value}" if value != "" else '""'


def test_readme_configuration_table_matches_the_schema():
    """Every key in proxy/config.py's SCHEMA is in the README's configuration table, with its real default
    (a row saying "provider's", "derived" or nothing defers to the provider preset or is required)."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration reference") :]
    table = table[: table.index("\n## ")]
    documented: dict[str, str | None] = {}
    for keys_cell, default_cell in re.findall(r"^\| ((?:`[a-z_]+\.[a-z_]+`(?: / )?)+) \|([^|]*)\|", table, re.M):
        keys = re.findall(r"`([a-z_]+\.[a-z_]+)`", keys_cell)
        defaults = [d.strip() for d in default_cell.split(" / ")] if " / " in default_cell else [default_cell.strip()]
        for key, default in zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults, strict=True):
            documented[key] = default[1:-1] if default.startswith("`") and default.endswith("`") else None
    schema_keys = {f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys}
    assert schema_keys - set(documented) == set(), "keys missing from the README's table"
    assert set(documented) - schema_keys == set(), "the README documents keys that do not exist"
    wrong = {
        key: (documented[key], _readme_default(SCHEMA[key.split(".")[0]][key.split(".")[1]][1]))
        for key in sorted(schema_keys)
        if documented[key] is not None
        and documented[key] != _readme_default(SCHEMA[key.split(".")[0]][key.split(".")[1]][1])
    }
    assert wrong == {}, "README default != SCHEMA default"
