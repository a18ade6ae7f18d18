"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

What can be checked here is checked for real: the image's ENTRYPOINT runs (the installed console
script) with the image's ENV, and the image's HEALTHCHECK command runs exactly as written against
it, healthy while it serves and failing once it is gone. The rest is read from the files: stages,
base image, user, and that every variable they set is a configuration key.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import ENV_CONFIG_PATH, ENV_PREFIX, SCHEMA, SECRET_KEYS, load_config
from tests.fakes.servers import start_api, start_idp

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "clang", "python3-dev", "libc6-dev", "curl", "wget")
STARTUP_TIMEOUT_S = 20.0


# --- reading the Dockerfile ----------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):  # a comment, also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        pending += stripped
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument; the shell form runs under /bin/sh -c, as Docker does."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return ["/bin/sh", "-c", args]


def env_of(stage: Stage) -> dict[str, str]:
    """ENV instructions of a stage, in both the ``KEY=value ...`` and the legacy ``KEY value`` forms."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        if "=" not in args.split()[0]:
            key, _, value = args.partition(" ")
            env[key] = value.strip()
            continue
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its command."""
    args = stage.last("HEALTHCHECK")
    options: dict[str, str] = {}
    while args.startswith("--"):
        option, _, args = args.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        args = args.strip()
    keyword, _, command = args.partition(" ")
    assert keyword.upper() == "CMD", "HEALTHCHECK must run a command (not NONE)"
    return options, exec_form(command.strip())


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    assert total > 0, f"cannot read the duration {duration!r}"
    return total


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


FINAL = parse_dockerfile(DOCKERFILE.read_text())[-1]


def test_dockerfile_parser_reads_what_docker_reads():
    """The little parser joins continuations and reads both ENV forms (so the checks below mean something)."""
    stages = parse_dockerfile('FROM a AS b\n# c\nRUN x \\\n  # inside\n  y\nFROM b\nENV K=v L="two words"\nENV M n\n')
    assert [(s.base, s.name) for s in stages] == [("a", "b"), ("b", "")]
    assert stages[0].instructions == [("RUN", "x y")]
    assert env_of(stages[1]) == {"K": "v", "L": "two words", "M": "n"}
    assert exec_form("echo hi") == ["/bin/sh", "-c", "echo hi"]


# --- the image, read ------------------------------------------------------------------------------


def test_multi_stage_slim_with_the_wheel_built_in_the_builder():
    """A builder stage builds the wheels; the final stage is a slim Python that installs them from it."""
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2
    builder = stages[0]
    assert builder.name
    assert any("pip wheel" in run or "-m build" in run for run in builder.all("RUN"))
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", FINAL.base)
    installs = [run for run in FINAL.all("RUN") if "pip install" in run]
    assert installs and all("--no-index" in run for run in installs)  # nothing fetched at this stage
    assert any(f"from={builder.name}" in run for run in installs) or any(
        f"--from={builder.name}" in copy for copy in FINAL.all("COPY")
    )


def test_final_stage_has_no_build_tools():
    """Nothing in the final stage installs a compiler, headers, curl or wget."""
    text = "\n".join(args for _, args in FINAL.instructions).lower()
    assert "apt-get install" not in text and "apk add" not in text
    for tool in BUILD_TOOLS:
        assert tool not in text, tool


def test_runs_as_a_non_root_user():
    """USER is set in the final stage, before the entrypoint, and is neither root nor uid 0."""
    user = FINAL.last("USER")
    name, _, group = user.partition(":")
    assert name not in ("root", "0", "")
    assert group not in ("root", "0")
    keywords = [kw for kw, _ in FINAL.instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    if name.isdigit():  # the numeric id exists, so `ps` and file ownership make sense
        assert any(f"--uid {name}" in run for run in FINAL.all("RUN"))


def test_listens_on_all_interfaces_inside_the_container_only():
    """The image sets listen.host to 0.0.0.0 and exposes 8360; the program's own default stays loopback."""
    env = env_of(FINAL)
    assert env["OAUTH_SIDECAR_LISTEN_HOST"] == "0.0.0.0"
    assert SCHEMA["listen"]["host"][1] == "127.0.0.1"
    assert SCHEMA["listen"]["port"][1] == 8360
    assert "8360" in FINAL.last("EXPOSE").split()
    assert all(is_config_variable(k) for k in env if k.startswith(ENV_PREFIX))


def test_entrypoint_is_the_console_script_and_healthcheck_needs_no_curl():
    """ENTRYPOINT is ["oauth-sidecar"] and the HEALTHCHECK asks /-/healthy with Python's urllib."""
    assert exec_form(FINAL.last("ENTRYPOINT")) == ["oauth-sidecar"]
    options, command = healthcheck(FINAL)
    assert command[0] == "python"
    assert "urllib" in " ".join(command) and "/-/healthy" in " ".join(command)
    assert "curl" not in " ".join(command) and "wget" not in " ".join(command)
    assert seconds(options["timeout"]) <= seconds(options["interval"])


def test_dockerignore_keeps_local_config_and_secrets_out():
    """The build context is an allow-list: config.toml, secrets/ and .git never reach the builder."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] in ("*", "**")
    included = {p[1:] for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "README.md"} <= included and "proxy" in {p.rstrip("/*") for p in included}
    copied = " ".join(args for stage in parse_dockerfile(DOCKERFILE.read_text()) for args in stage.all("COPY"))
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
    env.update(env_of(FINAL))
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
    entrypoint = exec_form(FINAL.last("ENTRYPOINT"))
    cmd = exec_form(FINAL.last("CMD")) if FINAL.all("CMD") else []
    options, check = healthcheck(FINAL)
    check_limit = seconds(options.get("timeout", "30s"))

    proc = await asyncio.create_subprocess_exec(
        _console_script(entrypoint[0], search_path),
        *entrypoint[1:],
        *cmd,
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


def block_yaml(text: str) -> Any:
    """The block-style YAML the compose file is written in: mappings, ``- `` lists, ``>-`` folded
    scalars, ``[a, b]`` flow lists and quoted scalars. PyYAML is not a test dependency, and without a
    reader the structure checks below would have nothing to check."""
    rows: list[tuple[int, str]] = []
    for line in text.splitlines():
        content = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if content.strip():
            rows.append((len(content) - len(content.lstrip()), content.strip()))
    pos = 0

    def scalar(value: str) -> Any:
        if value.startswith("[") and value.endswith("]"):
            return [scalar(part.strip()) for part in value[1:-1].split(",") if part.strip()]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            return value[1:-1]
        return value

    def value_after(value: str, indent: int) -> Any:
        nonlocal pos
        if value in (">", ">-", "|", "|-"):
            folded = []
            while pos < len(rows) and rows[pos][0] > indent:
                folded.append(rows[pos][1])
                pos += 1
            return ("\n" if value.startswith("|") else " ").join(folded)
        if value:
            return scalar(value)
        if pos < len(rows) and rows[pos][0] > indent:
            return block(rows[pos][0])
        return None

    def block(indent: int) -> Any:
        nonlocal pos
        if rows[pos][1].startswith("- "):
            items = []
            while pos < len(rows) and rows[pos][0] == indent and rows[pos][1].startswith("- "):
                pos += 1
                items.append(value_after(rows[pos - 1][1][2:].strip(), indent))
            return items
        mapping: dict[str, Any] = {}
        while pos < len(rows) and rows[pos][0] == indent:
            key, colon, value = rows[pos][1].partition(":")
            assert colon, f"not a block mapping entry: {rows[pos][1]!r}"
            pos += 1
            mapping[key.strip()] = value_after(value.strip(), indent)
        return mapping

    document = block(rows[0][0])
    assert pos == len(rows), f"unread from: {rows[pos][1]!r}"
    return document


def compose_document() -> Any:
    """docker-compose.yml, read by PyYAML when installed, else by block_yaml()."""
    try:
        import yaml
    except ImportError:
        return block_yaml(compose_text())
    return yaml.safe_load(compose_text())


def compose_env() -> dict[str, str]:
    """The sidecar service's environment."""
    env = compose_document()["services"]["sidecar"]["environment"]
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def test_compose_reader_reads_what_compose_reads():
    """The little YAML reader gives what PyYAML gives for the forms the compose file uses (so the checks
    below mean something without PyYAML)."""
    text = (
        "# a comment\nservices:\n  a:\n    build: .\n    cap_drop: [ALL]\n    stop_grace_period: 40s  # why\n"
        "    environment:\n      K: \"v\"\n      L: 'w x'\n    secrets:\n      - s1\n      - s2\n"
        "    command:\n      - >-\n        one two\n        three\n    depends_on:\n      b:\n"
        "        condition: service_healthy\nsecrets:\n  s1:\n    file: ./s1\n"
    )
    assert block_yaml(text) == {
        "services": {
            "a": {
                "build": ".",
                "cap_drop": ["ALL"],
                "stop_grace_period": "40s",
                "environment": {"K": "v", "L": "w x"},
                "secrets": ["s1", "s2"],
                "command": ["one two three"],
                "depends_on": {"b": {"condition": "service_healthy"}},
            }
        },
        "secrets": {"s1": {"file": "./s1"}},
    }


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

    loaded = dict(env_of(FINAL))
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
