"""The benchmark: the sidecar against the upstream directly and against nginx as a reference proxy.

    python -m bench.run [--duration 10] [--json bench/results.json] [--quick] [--workers N]

Starts, all on 127.0.0.1: a fast upstream (nginx when installed, else a minimal aiohttp server)
serving a 200-byte JSON body and a 100 MiB file; a fake identity provider (proxy.demo.DemoIdP,
each token request slowed by 200 ms); the sidecar in front of the upstream, in its default
configuration (``sidecar``, access log on) and without the access log (``sidecar_quiet``); nginx as a
reference proxy (one worker) when installed; aiohttp's server answering by itself (``aiohttp_alone``), the
ceiling of anything built on it; and the floor sticks of bench/servers.py, a proxy that forwards through
the sidecar's pool and does nothing else, as an aiohttp Application (``minimal_proxy``) and on aiohttp's
low-level server (``lowlevel_proxy``: the floor the sidecar's CPU per request is held to). On a machine
with two or more cores the proxies are pinned to core 0 and the upstream, the identity provider and the
load generator to core 1.

With ``--workers N``, two more sidecars, neither pinned: ``sidecar_unpinned`` (one process) and
``sidecar_workers`` (``listen.workers = N``), so the ratio of the two is what N workers give over one
under the same conditions (sharing every core with the upstream and the load generator).

CPU per request (the target's CPU time from /proc over the requests it answered) of the proxies the CPU
goals compare is measured in turns after the rounds: ``--cpu-slices`` runs of one second at c=64 each,
taking turns, total CPU over total requests (see cpu_per_request); the rounds' medians stay in the JSON
(``c64_cpu_us_rounds_median``).

Load comes from wrk when installed (``wrk -t1 -cN -dDs --latency``), else from bench/loadgen.py.
It prints one table (req/s and p50/p99 at c=1 and c=64, streaming MB/s, RSS growth with 8 parallel
100 MiB downloads, p99 while the token is refreshed every 2 s) and the ratios sidecar/nginx and
sidecar/direct, all measured in this one run, and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import loadgen
from bench.servers import SMALL_BODY

ROOT = Path(__file__).resolve().parent.parent
BIG_BYTES = 100 * 1024 * 1024
IDP_DELAY_S = 0.2  # every token request takes this long: a request that waited on it would show
REFRESH_LIFETIME_S = 4.0  # refreshed at half its lifetime: every 2 s during the refresh run
STEADY_LIFETIME_S = 3600.0
PARALLEL_DOWNLOADS = 8
DOWNLOADS = 5  # per round and streamed target, interleaved
STREAMED = ("direct", "nginx", "sidecar")  # the reference proxies buffer whole bodies: small ones only
SAME_CORE = ("nginx", "sidecar", "minimal_proxy")  # c=1 also measured with the proxy on the client's core
# CPU per request of these is measured in turns (cpu_per_request): the ratios the CPU goals are about.
CPU_COMPARED = ("nginx", "sidecar", "sidecar_quiet", "sidecar_baseline", "minimal_proxy", "lowlevel_proxy")
CPU_SLICE_S = 1.0
# Sets of 10 turns on this 2-core VM gave ratios ±5 % apart with nothing changed; 30 turns narrow that.
CPU_SLICES = 30
READY_TIMEOUT_S = 20.0


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    errors: int = 0
    cpu_us: float | None = None  # the target process's CPU time (all threads) per request, from /proc


@dataclass
class Target:
    name: str
    port: int
    pid: int | None = None
    c1: Load | None = None
    c64: Load | None = None
    stream_mb_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, argv: list[str]) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *argv]
    return argv


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def pinned_to(pid: int, core: int) -> Iterator[None]:
    """Move a running process (its threads and its children: nginx's worker) to ``core`` for a while.

    At c=1 every request crosses cores four times (client -> proxy -> upstream and back); on a virtual
    machine each wake-up of an idle core costs tens of microseconds, more than nginx's own work. The
    proxy on the client's core shows the latency a proxy adds by its own work.
    """
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        yield
        return
    pids = [pid, *(int(child) for child in _children(pid))]
    try:
        for p in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(p)], capture_output=True, check=True)
        yield
    finally:
        for p in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(p)], capture_output=True, check=False)


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def wait_http(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {url} did not answer 200 within {timeout_s:g}s")
        time.sleep(0.1)


def nginx_conf(tmp: Path, name: str, http: str) -> str:
    """A one-worker, foreground nginx configuration keeping its files in ``tmp`` under ``name``."""
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-{name}.pid;
error_log {tmp}/nginx-{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body; proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fcgi; uwsgi_temp_path {tmp}/{name}-uwsgi; scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 1000000;
{http}
}}
"""


def nginx_upstream_conf(tmp: Path, port: int) -> str:
    body = SMALL_BODY.decode().replace("'", "")
    return nginx_conf(
        tmp,
        "upstream",
        f"""  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    location = /small {{ default_type application/json; return 200 '{body}'; }}
    location = /big {{ default_type application/octet-stream; alias {tmp}/big.bin; }}
  }}""",
    )


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int) -> str:
    return nginx_conf(
        tmp,
        "proxy",
        f"""  upstream api {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token-for-the-reference-proxy";
      # Buffer in memory only: with the defaults, nginx spools large responses to temp files on disk
      # and streams at a third of this speed, which would flatter the sidecar.
      proxy_max_temp_file_size 0;
      proxy_buffers 32 64k;
      proxy_buffer_size 64k;
      proxy_busy_buffers_size 128k;
    }}
  }}""",
    )


def sidecar_conf(
    tmp: Path, name: str, port: int, upstream_port: int, idp_port: int, access_log: bool, workers: int = 1
) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[listen]
port = {port}
workers = {workers}
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[auth]
provider = "keycloak"
token_url = "http://127.0.0.1:{idp_port}/realms/demo/protocol/openid-connect/token"
client_id = "demo-client"
username = "demo"
password = "demo"
refresh_margin_s = 60
[log]
level = "info"
access_log = {"true" if access_log else "false"}
"""
    )
    return path


# --- measuring ---------------------------------------------------------------------------------

_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_ERRORS = re.compile(
    r"Non-2xx or 3xx responses:\s+(\d+)|Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread it ran, ended ones too) and of its live children (nginx's
    worker, taskset's child), from /proc. Clock ticks are 10 ms, so a 1 s turn is measured to about 1 %;
    summed over the turns of cpu_per_request, to well under that."""
    total = 0
    for p in [str(pid), *_children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def load(port: int, path: str, connections: int, duration_s: float, pid: int | None = None) -> Load:
    """One load run; with ``pid``, also the target's CPU time per request (throughput on a shared VM
    drifts by tens of percent, CPU per request much less)."""
    before = cpu_seconds(pid) if pid is not None and Path(f"/proc/{pid}/stat").exists() else None
    result = _load(port, path, connections, duration_s)
    if before is not None and pid is not None and result.rps > 0:
        result.cpu_us = (cpu_seconds(pid) - before) / (result.rps * duration_s) * 1e6
    return result


def _load(port: int, path: str, connections: int, duration_s: float) -> Load:
    url = f"http://127.0.0.1:{port}{path}"
    if shutil.which("wrk"):
        out = subprocess.run(
            pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", url]),
            capture_output=True,
            text=True,
            timeout=duration_s + 30,
            check=True,
        ).stdout
        lat = {q: float(v) * _UNIT_US[u] for q, v, u in _WRK_LATENCY.findall(out)}
        errors = 0
        for m in _WRK_ERRORS.finditer(out):
            errors += sum(int(g) for g in m.groups() if g)
        return Load(float(_WRK_RPS.search(out).group(1)), lat["50"], lat["99"], errors)  # type: ignore[union-attr]
    result = asyncio.run(loadgen.run("127.0.0.1", port, path, connections, duration_s))
    return Load(result.rps, result.percentile(0.5) * 1e6, result.percentile(0.99) * 1e6, result.errors)


def download(port: int) -> float:
    """Seconds to download /big once (curl when installed: its own cost stays small)."""
    url = f"http://127.0.0.1:{port}/big"
    started = time.perf_counter()
    if shutil.which("curl"):
        out = subprocess.run(
            pinned(1, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url]),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        size = int(float(out))
    else:
        size = 0
        with urllib.request.urlopen(url, timeout=120) as resp:
            while chunk := resp.read(1 << 20):
                size += len(chunk)
    elapsed = time.perf_counter() - started
    if size != BIG_BYTES:
        raise SystemExit(f"bench: download through port {port} gave {size} bytes, expected {BIG_BYTES}")
    return elapsed


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_growth_during_downloads(port: int, pid: int) -> tuple[float, float]:
    """(RSS before, peak RSS growth) in MiB while PARALLEL_DOWNLOADS downloads run at once."""
    before = rss_bytes(pid)
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        threads = [threading.Thread(target=download, args=(port,)) for _ in range(PARALLEL_DOWNLOADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        stop.set()
        sampler.join()
    return before / 2**20, (peak - before) / 2**20


def token_counters(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/status", timeout=5) as resp:
        return dict(json.load(resp)["counters"])


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[dict[str, object]]:
    procs = Processes()
    cleanup: list[list[str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="oauth-sidecar-bench-"))
    tmp.chmod(0o755)  # nginx's workers run as another user when started as root
    try:
        with (tmp / "big.bin").open("wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(BIG_BYTES >> 20):
                f.write(block)
        python = sys.executable
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        up_port = free_port()
        if nginx:
            (tmp / "upstream.conf").write_text(nginx_upstream_conf(tmp, up_port))
            procs.start(pinned(1, [nginx, "-c", str(tmp / "upstream.conf")]), tmp / "upstream.log")
            upstream_kind = "nginx"
        else:
            argv = [python, "-m", "bench.servers", "upstream", str(up_port), str(tmp)]
            procs.start(pinned(1, argv), tmp / "upstream.log", env)
            upstream_kind = "aiohttp"
        wait_http(f"http://127.0.0.1:{up_port}/small")

        targets: dict[str, Target] = {"direct": Target("direct", up_port)}
        spread: dict[str, int] = {}
        if nginx:
            port = free_port()
            (tmp / "proxy.conf").write_text(nginx_proxy_conf(tmp, port, up_port))
            proc = procs.start(pinned(0, [nginx, "-c", str(tmp / "proxy.conf")]), tmp / "nginx-proxy.log")
            wait_http(f"http://127.0.0.1:{port}/small")
            targets["nginx"] = Target("nginx", port, proc.pid)

        # The default configuration (access log on) is "sidecar"; "sidecar_quiet" is the same without it.
        sidecars = [
            ("sidecar", STEADY_LIFETIME_S, True, env),
            ("sidecar_quiet", STEADY_LIFETIME_S, False, env),
            ("sidecar_refreshing", REFRESH_LIFETIME_S, True, env),
        ]
        if args.workers > 1:  # name -> listen.workers; these two run on every core (see the docstring)
            spread = {"sidecar_unpinned": 1, "sidecar_workers": args.workers}
            sidecars += [(name, STEADY_LIFETIME_S, True, env) for name in spread]
        if args.baseline:
            # The same sidecar at another commit, in the same run: what a change costs, as a ratio.
            tree = tmp / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True
            )
            cleanup.append(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])
            sidecars.append(("sidecar_baseline", STEADY_LIFETIME_S, True, {**env, "PYTHONPATH": str(tree)}))
        for name, lifetime, access, side_env in sidecars:
            idp_port = free_port()
            procs.start(
                pinned(1, [python, "-m", "bench.servers", "idp", str(idp_port), str(lifetime), str(IDP_DELAY_S)]),
                tmp / f"{name}-idp.log",
                env,
            )
            port = free_port()
            conf = sidecar_conf(tmp, name, port, up_port, idp_port, access, spread.get(name, 1))
            argv = [python, "-m", "proxy", "--config", str(conf)]
            argv = argv if name in spread else pinned(0, argv)
            proc = procs.start(argv, tmp / f"{name}.log", side_env, cwd=Path(side_env["PYTHONPATH"]))
            wait_http(f"http://127.0.0.1:{port}/-/ready")
            targets[name] = Target(name, port, proc.pid)

        # Measuring sticks (bench/servers.py): aiohttp's server answering by itself, the ceiling of anything
        # built on it; the least a proxy on aiohttp's server can do (forward through the sidecar's pool,
        # nothing else), as an Application and on the low-level web.Server (the floor the sidecar is held
        # to); the same on bare asyncio transports and httptools.
        for name, argv in (
            ("aiohttp_alone", ["upstream", str(tmp)]),
            ("minimal_proxy", ["minimal_proxy", str(up_port)]),
            ("lowlevel_proxy", ["lowlevel_proxy", str(up_port)]),
            ("lean_proxy", ["lean_proxy", str(up_port)]),
        ):
            port = free_port()
            argv = [python, "-m", "bench.servers", argv[0], str(port), *argv[1:]]
            proc = procs.start(pinned(0, argv), tmp / f"{name}.log", env)
            wait_http(f"http://127.0.0.1:{port}/small")
            targets[name] = Target(name, port, proc.pid)
        yield {"targets": targets, "upstream": upstream_kind, "tmp": tmp, "nginx": bool(nginx)}
    finally:
        procs.stop_all()
        for argv in cleanup:
            subprocess.run(argv, check=False, capture_output=True)
        if args.keep:
            print(f"bench: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def cpu_per_request(targets: list[Target], slices: int, slice_s: float) -> dict[str, float]:
    """CPU µs per request at c=64 of each target, the targets taking turns in ``slices`` short runs each:
    the sum of CPU time over the sum of requests. The ratios of these are what the CPU goals are about;
    a shared machine's speed drifts by tens of per cent over seconds, and turns this short make every
    target see the same drift (runs of several seconds, one target after the other, did not)."""
    cpu = dict.fromkeys((t.name for t in targets), 0.0)
    done = dict.fromkeys((t.name for t in targets), 0.0)
    for _ in range(slices):
        for t in targets:
            assert t.pid is not None
            before = cpu_seconds(t.pid)
            result = _load(t.port, "/small", 64, slice_s)
            cpu[t.name] += cpu_seconds(t.pid) - before
            done[t.name] += result.rps * slice_s
    return {name: cpu[name] / done[name] * 1e6 for name in cpu if done[name] > 0}


def median_load(runs: list[Load]) -> Load:
    cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
    return Load(
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_us for r in runs),
        statistics.median(r.p99_us for r in runs),
        sum(r.errors for r in runs),
        statistics.median(cpu) if cpu else None,
    )


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Every target is measured once per round, the rounds interleaved, and each figure is the median
    over the rounds: a shared machine drifts by tens of percent over minutes, and interleaving makes
    the ratios (what the targets are about) robust to it."""
    with environment(args) as env:
        targets: dict[str, Target] = env["targets"]  # type: ignore[assignment]
        d = args.duration
        c1: dict[str, list[Load]] = {name: [] for name in targets}
        c64: dict[str, list[Load]] = {name: [] for name in targets}
        streams: dict[str, list[float]] = {name: [] for name in targets}
        same_core: dict[str, list[float]] = {name: [] for name in targets}
        refreshing = targets["sidecar_refreshing"]
        before = token_counters(refreshing.port)
        for t in targets.values():
            load(t.port, "/small", 8, 1.0)  # warm up: connections, caches
        for round_no in range(args.rounds):
            for t in targets.values():
                c1[t.name].append(load(t.port, "/small", 1, d, t.pid))
                c64[t.name].append(load(t.port, "/small", 64, d, t.pid))
                if t.name in SAME_CORE and t.pid is not None:
                    with pinned_to(t.pid, 1):
                        same_core[t.name].append(load(t.port, "/small", 1, d).p50_us)
            # A download takes a tenth of a second: several per round, the targets taking turns, so that
            # one hiccup of a shared machine is not the round's figure.
            for _ in range(args.downloads):
                for t in targets.values():
                    if t.name in STREAMED:
                        streams[t.name].append(BIG_BYTES / 1e6 / download(t.port))
            print(f"  round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        # CPU per request of the proxies the CPU goals compare, from their turns (cpu_per_request).
        compared = [t for name, t in targets.items() if name in CPU_COMPARED and t.pid is not None]
        turns = cpu_per_request(compared, args.cpu_slices, CPU_SLICE_S)
        print("  CPU turns done", file=sys.stderr)
        after = token_counters(refreshing.port)
        refreshing.extra["refreshes_during_run"] = after["refreshes"] - before["refreshes"]
        refreshing.extra["logins_during_run"] = after["logins"] - before["logins"]
        for t in targets.values():
            t.c1, t.c64 = median_load(c1[t.name]), median_load(c64[t.name])
            if t.name in turns:
                t.extra["c64_cpu_us_rounds_median"] = round(t.c64.cpu_us or 0.0, 1)
                t.c64.cpu_us = turns[t.name]
            if streams[t.name]:
                t.stream_mb_s = statistics.median(streams[t.name])
            if same_core[t.name]:
                t.extra["c1_p50_us_same_core"] = statistics.median(same_core[t.name])

        for name in ("sidecar", "nginx"):
            t = targets.get(name)
            if t is not None and t.pid is not None:
                base, growth = rss_growth_during_downloads(t.port, t.pid)
                t.extra["rss_before_mib"] = round(base, 1)
                t.extra["rss_growth_mib"] = round(growth, 1)
        return {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "upstream": env["upstream"],
            "load_generator": "wrk" if shutil.which("wrk") else "bench/loadgen.py",
            "duration_s": d,
            "rounds": args.rounds,
            "cpu_slices": args.cpu_slices,
            "targets": {name: asdict(t) for name, t in targets.items()},
        }


def ratios(results: dict[str, object]) -> dict[str, float]:
    t = results["targets"]  # type: ignore[index]
    side, direct, ngx = t["sidecar"], t["direct"], t.get("nginx")  # type: ignore[index,union-attr]
    out = {
        "c64_rps_sidecar_over_direct": side["c64"]["rps"] / direct["c64"]["rps"],
        "added_p50_us_over_direct_c1": side["c1"]["p50_us"] - direct["c1"]["p50_us"],
        "stream_sidecar_over_direct": side["stream_mb_s"] / direct["stream_mb_s"],
        "rss_growth_mib_8x100MiB": side["extra"]["rss_growth_mib"],
        "p99_c64_refreshing_over_steady": t["sidecar_refreshing"]["c64"]["p99_us"] / side["c64"]["p99_us"],
        "c64_rps_sidecar_over_aiohttp_alone": side["c64"]["rps"] / t["aiohttp_alone"]["c64"]["rps"],
        "c64_rps_sidecar_over_minimal_proxy": side["c64"]["rps"] / t["minimal_proxy"]["c64"]["rps"],
        "added_p50_us_over_direct_c1_same_core": side["extra"]["c1_p50_us_same_core"] - direct["c1"]["p50_us"],
    }
    for name in ("lowlevel_proxy", "minimal_proxy", "sidecar_baseline", "nginx"):  # CPU per request, over each
        other = t.get(name)  # type: ignore[union-attr]
        if other is not None and other["c64"].get("cpu_us") and side["c64"].get("cpu_us"):
            out[f"c64_cpu_per_request_sidecar_over_{name}"] = side["c64"]["cpu_us"] / other["c64"]["cpu_us"]
    quiet, floor = t.get("sidecar_quiet"), t.get("lowlevel_proxy")  # type: ignore[union-attr]
    if quiet is not None and floor is not None and quiet["c64"].get("cpu_us") and floor["c64"].get("cpu_us"):
        out["c64_cpu_per_request_sidecar_quiet_over_lowlevel_proxy"] = quiet["c64"]["cpu_us"] / floor["c64"]["cpu_us"]
    if t.get("sidecar_workers") is not None:  # type: ignore[union-attr]
        many, one = t["sidecar_workers"]["c64"], t["sidecar_unpinned"]["c64"]
        out["c64_rps_workers_over_one_unpinned"] = many["rps"] / one["rps"]
        out["c64_rps_workers_over_one_pinned"] = many["rps"] / side["c64"]["rps"]
        if many.get("cpu_us") and one.get("cpu_us"):
            out["c64_cpu_per_request_workers_over_one_unpinned"] = many["cpu_us"] / one["cpu_us"]
    if t.get("sidecar_baseline") is not None:  # type: ignore[union-attr]
        out["c64_rps_sidecar_over_baseline"] = side["c64"]["rps"] / t["sidecar_baseline"]["c64"]["rps"]
    if ngx is not None:
        out["c64_rps_sidecar_over_nginx"] = side["c64"]["rps"] / ngx["c64"]["rps"]
        out["c1_rps_sidecar_over_nginx"] = side["c1"]["rps"] / ngx["c1"]["rps"]
        out["stream_sidecar_over_nginx"] = side["stream_mb_s"] / ngx["stream_mb_s"]
        out["c64_rps_aiohttp_alone_over_nginx"] = t["aiohttp_alone"]["c64"]["rps"] / ngx["c64"]["rps"]
        out["added_p50_us_nginx_over_direct_c1"] = ngx["c1"]["p50_us"] - direct["c1"]["p50_us"]
        same_core = ngx["extra"]["c1_p50_us_same_core"]
        out["added_p50_us_nginx_over_direct_c1_same_core"] = same_core - direct["c1"]["p50_us"]
        out["c64_rps_minimal_proxy_over_nginx"] = t["minimal_proxy"]["c64"]["rps"] / ngx["c64"]["rps"]
        out["c64_rps_lean_proxy_over_nginx"] = t["lean_proxy"]["c64"]["rps"] / ngx["c64"]["rps"]
    return {k: round(v, 3) for k, v in out.items()}


TARGETS = {  # what each ratio must reach (the performance goals in README "Performance")
    "c64_cpu_per_request_sidecar_over_lowlevel_proxy": ("<=", 1.30),
    "c64_rps_sidecar_over_nginx": (">=", 0.30),
    "added_p50_us_over_direct_c1": ("<=", 100.0),
    "stream_sidecar_over_nginx": (">=", 0.80),
    "rss_growth_mib_8x100MiB": ("<=", 16.0),
    "p99_c64_refreshing_over_steady": ("<=", 1.5),
}


def report(results: dict[str, object], r: dict[str, float]) -> str:
    lines = [
        f"upstream: {results['upstream']}, load: {results['load_generator']}, {results['duration_s']}s per run, "
        f"median of {results['rounds']} interleaved rounds; c=64 CPU/req of {', '.join(CPU_COMPARED)}: "
        f"{results.get('cpu_slices', '?')} turns of {CPU_SLICE_S:g} s each, total CPU over total requests",
        "",
        "| target | c=1 req/s | c=1 p50 | c=1 p99 | c=64 req/s | c=64 p50 | c=64 p99 | c=64 CPU/req | 100 MiB stream |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in results["targets"].items():  # type: ignore[attr-defined]
        c1, c64 = t["c1"], t["c64"]
        stream = f"{t['stream_mb_s']:,.0f} MB/s" if t["stream_mb_s"] else "–"
        cpu = f"{c64['cpu_us']:,.0f} µs" if c64.get("cpu_us") is not None else "–"
        lines.append(
            f"| {name} | {c1['rps']:,.0f} | {c1['p50_us']:,.0f} µs | {c1['p99_us']:,.0f} µs | {c64['rps']:,.0f} "
            f"| {c64['p50_us']:,.0f} µs | {c64['p99_us']:,.0f} µs | {cpu} | {stream} |"
        )
    lines.append("")
    for name, t in results["targets"].items():  # type: ignore[attr-defined]
        errors = t["c1"]["errors"] + t["c64"]["errors"]
        if errors:  # wrk counts an error answer as a request: a target answering errors fast looks fast
            lines.append(f"WARNING: {name} answered {errors} requests with an error or none; its figures are void")
    for name, t in results["targets"].items():  # type: ignore[attr-defined]
        if t["extra"]:
            lines.append(f"{name}: " + ", ".join(f"{k} = {v:g}" for k, v in t["extra"].items()))
    lines += ["", "| ratio (this run) | value | target | met |", "|---|---|---|---|"]
    for key, value in r.items():
        goal = TARGETS.get(key)
        if goal is None:
            lines.append(f"| {key} | {value:g} | – | – |")
        else:
            op, bound = goal
            met = value >= bound if op == ">=" else value <= bound
            lines.append(f"| {key} | {value:g} | {op} {bound:g} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument(
        "--cpu-slices",
        type=int,
        default=CPU_SLICES,
        metavar="K",
        help=f"turns of {CPU_SLICE_S:g} s each at c=64 for the CPU per request of {', '.join(CPU_COMPARED)} "
        f"(default {CPU_SLICES})",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write results")
    parser.add_argument(
        "--downloads",
        type=int,
        default=DOWNLOADS,
        metavar="K",
        help=f"100 MiB downloads per round (default {DOWNLOADS})",
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 download each: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with the logs")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the sidecar at this git commit (a worktree) as sidecar_baseline, to compare in one run",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="also run a sidecar with listen.workers = N, and one with 1, both unpinned (see above)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.cpu_slices, args.downloads = 2.0, 1, 2, 1
    results = measure(args)
    r = ratios(results)
    results["ratios"] = r
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, r))
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
