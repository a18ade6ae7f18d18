"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

What the image gives a user is asserted from the file's own lines: a non-root user, the console script
as the command in exec form (so SIGTERM reaches it), port 8360 exposed with the listener on every
interface inside the container only, and a health check without curl. What can be run here is run: the
ENTRYPOINT (the installed console script) with the image's ENV, and the HEALTHCHECK command exactly as
written against it, healthy while it serves and failing once it is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import ENV_CONFIG_PATH, ENV_PREFIX, SCHEMA, SECRET_KEYS, load_config
from tests.fakes.servers import start_api, start_idp

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "clang", "python3-dev", "libc6-dev", "curl", "wget")
STARTUP_TIMEOUT_S = 20.0


# --- the Dockerfile, line by line ----------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: a line ending in a backslash continues on the next one, a
    line starting with ``#`` is a comment (inside a continued instruction too). Nothing else is read."""
    found: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        found.append((keyword.upper(), args.strip()))
        pending = []
    return found


ALL = instructions(DOCKERFILE.read_text())
LAST_FROM = max(i for i, (keyword, _) in enumerate(ALL) if keyword == "FROM")
BUILDER, FINAL = ALL[:LAST_FROM], ALL[LAST_FROM:]  # the final stage starts at its FROM


def final(keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction in the final stage, in order."""
    return [args for kw, args in FINAL if kw == keyword]


def final_env() -> dict[str, str]:
    """The final stage's ENV, written as ``KEY=value`` words (the legacy ``ENV KEY value`` fails here)."""
    env: dict[str, str] = {}
    for args in final("ENV"):
        for word in shlex.split(args):
            key, equals, value = word.partition("=")
            assert equals, f"ENV {args!r}: write KEY=value"
            env[key] = value
    return env


def final_healthcheck() -> tuple[dict[str, str], list[str]]:
    """The final stage's one HEALTHCHECK: its ``--option=value`` settings and its exec-form command."""
    (args,) = final("HEALTHCHECK")
    match = re.fullmatch(r"((?:--[a-z-]+=\S+ )*)CMD (\[.*\])", args)
    assert match, f"HEALTHCHECK {args!r}: options, then CMD in exec form"
    options = dict(option[2:].split("=", 1) for option in match.group(1).split())
    return options, json.loads(match.group(2))


def seconds(duration: str) -> float:
    """A Docker duration such as ``30s`` or ``1m30s``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"cannot read the duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def is_config_variable(name: str) -> bool:
    """Whether ``name`` is a variable the configuration loader understands."""
    if name == ENV_CONFIG_PATH:
        return True
    if not name.startswith(ENV_PREFIX):
        return False
    section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
    if section not in SCHEMA:
        return False
    if key in SCHEMA[section]:
        return True
    return key.endswith("_file") and (section, key.removesuffix("_file")) in SECRET_KEYS


# --- what the image gives a user ---------------------------------------------------------------------


def test_runs_as_a_non_root_user_the_image_creates():
    """The container runs as uid:gid 10001:10001, a system user the final stage creates (not root, not 0)."""
    assert final("USER")[-1] == "10001:10001"
    runs = " ".join(final("RUN"))
    assert "groupadd --system --gid 10001 sidecar" in runs
    assert "useradd --system --uid 10001 --gid 10001" in runs


def test_the_command_is_the_console_script_in_exec_form():
    """`docker run IMAGE [ARGS]` runs `oauth-sidecar [ARGS]` as PID 1 (exec form: SIGTERM reaches it, not a
    shell), from /etc/oauth-sidecar, where a mounted config.toml is found."""
    assert final("ENTRYPOINT") == ['["oauth-sidecar"]']
    assert final("CMD") == []  # arguments given to `docker run` go to oauth-sidecar as they are
    assert final("STOPSIGNAL") == ["SIGTERM"]
    assert final("WORKDIR")[-1] == "/etc/oauth-sidecar"


def test_exposes_8360_listening_on_all_interfaces_inside_the_container_only():
    """Port 8360 is exposed and the image sets listen.host to 0.0.0.0; the program's own default stays
    127.0.0.1:8360. Every OAUTH_SIDECAR_* variable the image sets is a configuration key."""
    assert final("EXPOSE") == ["8360"]
    env = final_env()
    assert env["OAUTH_SIDECAR_LISTEN_HOST"] == "0.0.0.0"
    assert (SCHEMA["listen"]["host"][1], SCHEMA["listen"]["port"][1]) == ("127.0.0.1", 8360)
    assert [k for k in env if k.startswith(ENV_PREFIX) and not is_config_variable(k)] == []


def test_healthcheck_asks_healthy_with_the_images_own_python():
    """The health check is the image's Python asking /-/healthy (no curl or wget in a slim image), every
    30 s, giving up on an answer after 5 s, after 15 s to start and 3 failures."""
    options, command = final_healthcheck()
    assert options == {"interval": "30s", "timeout": "5s", "start-period": "15s", "retries": "3"}
    assert seconds(options["timeout"]) < seconds(options["interval"])
    assert command[:2] == ["python", "-c"] and len(command) == 3
    assert "urllib.request" in command[2] and "/-/healthy" in command[2]


def test_multi_stage_slim_with_the_wheel_built_in_the_builder():
    """A builder stage builds the wheels; the final stage is a slim Python that installs them from it, offline."""
    builder_from = [args for kw, args in BUILDER if kw == "FROM"]
    assert builder_from and builder_from[0].endswith(" AS builder")
    assert any("pip wheel" in args for kw, args in BUILDER if kw == "RUN")
    (base,) = final("FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base)
    installs = [run for run in final("RUN") if "pip install" in run]
    assert installs and all("--no-index" in run and "from=builder" in run for run in installs)


def test_final_stage_has_no_build_tools():
    """Nothing in the final stage installs a compiler, headers, curl or wget."""
    text = "\n".join(args for _, args in FINAL).lower()
    assert "apt-get install" not in text and "apk add" not in text
    for tool in BUILD_TOOLS:
        assert tool not in text, tool


def test_dockerignore_keeps_local_config_and_secrets_out():
    """The build context is an allow-list: config.toml, secrets/ and .git never reach the builder."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] in ("*", "**")
    included = {p[1:] for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "README.md"} <= included and "proxy" in {p.rstrip("/*") for p in included}
    copied = " ".join(args for kw, args in ALL if kw == "COPY")
    assert "config.toml" not in included and "secrets" not in copied


# --- the image's command and health check, run --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _path_with_python() -> str:
    """PATH with this interpreter's directory first: `python` and `oauth-sidecar` are the installed ones."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _console_script(name: str, path: str) -> str:
    found = shutil.which(name, path=path)
    assert found, f"{name} is not installed; run pip install -e '.[test]'"
    return found


async def _run(command: list[str], env: dict[str, str], limit_s: float) -> int:
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        return await asyncio.wait_for(proc.wait(), limit_s + 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_entrypoint_and_healthcheck_against_a_real_process(aiohttp_server, tmp_path):
    """The image's ENTRYPOINT, with the image's ENV and the compose file's settings (the host swapped
    for 127.0.0.1), serves: the HEALTHCHECK command, run as written, exits 0, a client reaching it as
    http://sidecar:8360 with the API key gets through; after SIGTERM it exits 0 and the check fails."""
    idp = await start_idp(aiohttp_server, users={"demo": "pw-docker-test-Rk40"})
    _, api_url = await start_api(aiohttp_server, idp)
    (tmp_path / "password").write_text("pw-docker-test-Rk40\n")
    (tmp_path / "api_key").write_text("ak-docker-test-Tq19\n")
    port = _free_port()
    search_path = _path_with_python()

    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(final_env())
    env.update(compose_env())
    env.update(
        {
            "PATH": search_path,
            "OAUTH_SIDECAR_LISTEN_HOST": "127.0.0.1",  # a test never listens beyond loopback
            "OAUTH_SIDECAR_LISTEN_PORT": str(port),
            "OAUTH_SIDECAR_UPSTREAM_URL": api_url,
            "OAUTH_SIDECAR_AUTH_PROVIDER": "keycloak",
            "OAUTH_SIDECAR_AUTH_TOKEN_URL": idp.token_url(),
            "OAUTH_SIDECAR_AUTH_CLIENT_ID": "demo-client",
            "OAUTH_SIDECAR_AUTH_USERNAME": "demo",
            "OAUTH_SIDECAR_AUTH_PASSWORD_FILE": str(tmp_path / "password"),
            "OAUTH_SIDECAR_ACCESS_API_KEY_FILE": str(tmp_path / "api_key"),
        }
    )
    (entrypoint_args,) = final("ENTRYPOINT")
    entrypoint = json.loads(entrypoint_args)
    options, check = final_healthcheck()
    check_limit = seconds(options["timeout"])

    proc = await asyncio.create_subprocess_exec(
        _console_script(entrypoint[0], search_path),
        *entrypoint[1:],
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        log: list[str] = []
        while not any("sidecar.listening" in line for line in log):
            assert loop.time() < deadline, "the entrypoint did not start listening"
            line = await asyncio.wait_for(proc.stderr.readline(), deadline - loop.time())
            assert line, "the entrypoint exited: " + "".join(log[-20:])
            log.append(line.decode(errors="replace"))
        assert await _run(check, env, check_limit) == 0

        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            sidecar = {"Host": f"sidecar:{port}"}
            for _ in range(250):
                async with session.get(url + "/v1/hello", headers={**sidecar, "X-Api-Key": "ak-docker-test-Tq19"}) as r:
                    if r.status == 200:
                        assert (await r.json())["subject"] == "demo"
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("never got through to the API")
            async with session.get(url + "/v1/hello", headers=sidecar) as r:
                assert r.status == 401  # the API key from the secret file is required
            async with session.get(url + "/v1/hello", headers={"Host": f"elsewhere:{port}"}) as r:
                assert r.status == 403  # only the service name is added to the Host names answered

        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.stderr.read(), 20)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert await _run(check, env, check_limit) != 0  # nothing listens: unhealthy
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- docker-compose.yml --------------------------------------------------------------------------


def compose_text() -> str:
    return COMPOSE.read_text()


def compose_document() -> Any:
    """docker-compose.yml as a YAML document."""
    return yaml.safe_load(compose_text())


def compose_env() -> dict[str, str]:
    """The sidecar service's environment."""
    env = compose_document()["services"]["sidecar"]["environment"]
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def test_compose_file_structure():
    """Two services, the sidecar built here and a client; secrets declared and handed to both."""
    assert "\t" not in compose_text()
    document = compose_document()
    services = document["services"]
    assert set(services) == {"sidecar", "client"}
    sidecar, client = services["sidecar"], services["client"]
    assert sidecar["build"] == "."
    assert "ports" not in sidecar  # reachable only on the compose network
    assert set(sidecar["secrets"]) == set(document["secrets"])
    assert "sidecar_api_key" in client["secrets"]
    assert client["depends_on"]["sidecar"]["condition"] == "service_healthy"
    command = " ".join(client["command"]) if isinstance(client["command"], list) else client["command"]
    assert "http://sidecar:8360/" in command and "X-Api-Key:" in command
    assert "/run/secrets/sidecar_api_key" in command
    grace = float(compose_env().get("OAUTH_SIDECAR_LISTEN_SHUTDOWN_GRACE_S", SCHEMA["listen"]["shutdown_grace_s"][1]))
    assert seconds(sidecar["stop_grace_period"]) > grace


def test_compose_environment_is_a_valid_configuration(tmp_path):
    """Every variable is a configuration key; secrets come from /run/secrets files, never inline; the
    service name is an allowed Host; and the whole environment loads as a configuration."""
    env = compose_env()
    assert env, "no OAUTH_SIDECAR_* variables found for the sidecar service"
    unknown = [name for name in env if not is_config_variable(name)]
    assert not unknown, unknown
    for section, key in SECRET_KEYS:
        assert f"{ENV_PREFIX}{section.upper()}_{key.upper()}" not in env  # no secret value in the file
    files = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert files and all(v.startswith("/run/secrets/") for v in files.values())
    assert "OAUTH_SIDECAR_ACCESS_API_KEY_FILE" in files
    assert "sidecar" in [h.strip() for h in env["OAUTH_SIDECAR_LISTEN_ALLOWED_HOSTS"].split(",")]

    loaded = final_env()
    for name, value in env.items():
        if name in files:
            secret = tmp_path / Path(value).name
            secret.write_text(f"value-of-{secret.name}\n")
            value = str(secret)
        loaded[name] = value
    config = load_config(None, loaded)
    assert config.listen.host == "0.0.0.0"
    assert "sidecar" in config.listen.allowed_hosts
    assert config.access.api_key == "value-of-sidecar_api_key"
    assert config.auth.password == "value-of-we360_password"
