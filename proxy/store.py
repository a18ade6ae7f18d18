"""The shared token store: one token for every process that uses the same credentials.

Theory of operation
-------------------
With ``store.kind = "memory"`` there is no store: each process is an island (the TokenManager alone).
With ``file`` (one host) or ``redis`` (a fleet) the processes that share a credential set share one
:class:`Entry`: the access token, the refresh token, their expiries as wall-clock times, what the
provider last said about the credentials (a refused login: the whole fleet backs off together), and a
version. The entry is stored under a name derived from the credential set (:func:`config_digest` of
the token URL, client id, user, grant and scope), so two credential sets never share one.

Three primitives make the fleet behave like one process (``tokens.py`` uses them):

* **a lease** (redis ``SET lease owner NX PX``, released by compare-and-delete; file: ``flock`` on a
  lock file, released by the kernel if the holder dies): only its holder talks to the identity
  provider. The others wait for the entry to change (pub/sub for redis, the file's stat for file),
  for no longer than the lease lives.
* **a fenced write** (:meth:`SharedStore.write`): a compare-and-swap on the version the holder read,
  which also requires the lease still to be the holder's; a holder that paused past its lease writes
  nothing. Before presenting a refresh token, the holder writes a *claim* (``refresh_claimed``): a
  later holder that finds a claim it did not make knows the refresh token may already be spent, and
  logs in instead of presenting it a second time (grants that can log in again; the others have no
  choice).
* **sealing** (:class:`Sealer`): every entry is encrypted and authenticated with AES-GCM under a key
  stretched by HKDF from ``store.key``; the version and the credential set's digest are the associated
  data, so an entry cannot be moved to another name or version. No token byte is readable in the file
  or in Redis.

When the store fails (Redis unreachable, a file that cannot be read, an entry this key cannot open),
:class:`SharedStore` raises :class:`StoreUnavailable`; the manager then does what it does without a
store, and the store is tried again after a backoff (:data:`RETRY_S` .. :data:`RETRY_CAP_S`). Each
change of state is logged once (``store.unavailable`` / ``store.available``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .config import AuthConfig, StoreConfig
from .observability import event

FORMAT = 1
HKDF_SALT = b"oauth-sidecar store"
HKDF_INFO = b"token entry v1"
NONCE_BYTES = 12
# How often a waiter looks again when no change notification arrives (file: the only way it learns).
POLL_S = 0.05
# After a store failure, skip the store this long before trying again (doubling, capped).
RETRY_S = 1.0
RETRY_CAP_S = 30.0
# Redis commands fail fast: a request waits for the store no longer than this per command.
REDIS_TIMEOUT_S = 1.0
# A version is a counter from 1: anything else stored as one (text, a float, a number past what Lua counts
# exactly) is a damaged entry, never a crash.
MAX_VERSION = 2**53 - 1
# A sealed entry is about a kilobyte and a half (two tokens of a few hundred bytes each, base64 and JSON).
MAX_BLOB_BYTES = 64 * 1024
# A store file holds a few entries of a few kB: a larger one is not ours (it is never read into memory).
MAX_FILE_BYTES = 1024 * 1024
# Entries outlive their last useful moment by this much (then Redis forgets them).
ENTRY_SLACK_S = 60.0
ENTRY_MIN_TTL_S = 300.0


class StoreUnavailable(Exception):
    """The store cannot be used now. The message is safe to log (no secret, no server text)."""


@dataclass(frozen=True)
class Entry:
    """What the fleet shares. Times are wall-clock seconds (processes do not share a monotonic clock)."""

    version: int = 0
    writer: str = ""  # owner id of the process that wrote it
    written_at: float = 0.0
    access_token: str = ""
    refresh_token: str = ""
    obtained_at: float = 0.0
    expires_at: float = 0.0
    refresh_expires_at: float | None = None
    subject: str = ""
    scope: str = ""
    refresh_claimed: str = ""  # owner id of a holder presenting refresh_token now (it may be spent)
    login_spent: bool = False  # authorization_code / refresh_token grants: the configured one was used up
    login_at: float = 0.0  # the last login attempt's answer (fleet-wide login spacing)
    rejected_until: float = 0.0  # the provider refused the credentials: no login before this
    rejections: int = 0  # refused logins in a row
    rejected_error: str = ""
    rejected_detail: str = ""
    store_written_at: float = 0.0  # written_at on the store's clock (redis TIME): readers correct for clock skew

    def __repr__(self) -> str:  # never the tokens
        return f"Entry(version={self.version}, writer={self.writer!r}, expires_at={self.expires_at})"


def config_digest(auth: AuthConfig) -> str:
    """The name of the credential set: two sets that differ in any of these never share an entry."""
    parts = (auth.token_url or auth.issuer, auth.client_id, auth.username, auth.grant_type, auth.scope)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def owner_id() -> str:
    """This process among the fleet: host, pid and a random tag (a pid is reused after a restart)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Sealer:
    """AES-GCM under a key stretched from ``store.key``; associated data = digest and version."""

    def __init__(self, key_text: str, digest: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=HKDF_INFO).derive(key_text.encode())
        self._aead = AESGCM(key)
        self._digest = digest.encode()

    def seal(self, entry: Entry) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(asdict(entry), separators=(",", ":")).encode()
        return nonce + self._aead.encrypt(nonce, plain, self._aad(entry.version))

    def open(self, blob: bytes, version: int) -> Entry:
        if len(blob) <= NONCE_BYTES:
            raise StoreUnavailable("the stored entry is truncated")
        try:
            plain = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], self._aad(version))
        except InvalidTag:
            raise StoreUnavailable(
                "the stored entry does not open with this store.key (another key, or it was tampered with)"
            ) from None
        data = json.loads(plain)
        known = {f.name for f in fields(Entry)}
        return Entry(**{k: v for k, v in data.items() if k in known})

    def _aad(self, version: int) -> bytes:
        return b"%s|%d" % (self._digest, version)


class Backend(Protocol):
    """Where sealed entries live. Every method raises StoreUnavailable (and nothing else) on failure."""

    kind: str

    async def load(self) -> tuple[int, bytes, float | None] | None:
        """The stored version, blob, and the store's own clock now (None: the store shares this process's
        clock: one host)."""
        ...

    async def clock(self) -> float | None:
        """The store's own clock (seconds), or None when it shares this process's."""
        ...

    async def swap(self, expected: int, blob: bytes, owner: str, ttl_s: float) -> bool:
        """Store ``blob`` as version ``expected + 1`` if the stored version is ``expected`` (0: none) and
        ``owner`` holds the lease."""
        ...

    async def lease(self, owner: str, ttl_s: float) -> bool: ...

    async def release(self, owner: str) -> None: ...

    async def wait(self, seconds: float) -> None:
        """Return when the entry may have changed or the lease may be free, at the latest after ``seconds``."""
        ...

    async def close(self) -> None: ...


# --- the file backend ------------------------------------------------------------------------------


class FileBackend:
    """One JSON file holding sealed entries by digest; the lease is an ``flock`` on ``path + ".lock"``."""

    kind = "file"

    def __init__(self, path: str, digest: str) -> None:
        self._path = Path(path)
        self._lock_path = Path(path + ".lock")
        self._digest = digest
        self._lock_fd: int | None = None
        self._seen: tuple[int, int, int] | None = None

    async def load(self) -> tuple[int, bytes, float | None] | None:
        record = self._read_all().get(self._digest)
        if not isinstance(record, dict):
            return None
        try:  # one host, one wall clock
            return _version(record["version"]), base64.b64decode(record["blob"], validate=True), None
        except (KeyError, TypeError, ValueError):
            raise StoreUnavailable(f"the store file {self._path} has a damaged entry") from None

    async def clock(self) -> float | None:
        return None

    async def swap(self, expected: int, blob: bytes, owner: str, ttl_s: float) -> bool:
        if self._lock_fd is None:  # only the lease holder writes; the kernel keeps the lock while it lives
            return False
        if not self._lock_is_current(self._lock_fd):  # the lock file was deleted or replaced: another may hold it
            await self.release(owner)
            return False
        entries = self._read_all()
        record = entries.get(self._digest)
        try:
            current = _version(record["version"]) if isinstance(record, dict) and "version" in record else 0
        except ValueError:
            raise StoreUnavailable(f"the store file {self._path} has a damaged entry") from None
        if current != expected:
            return False
        entries[self._digest] = {"version": expected + 1, "blob": base64.b64encode(blob).decode()}
        await asyncio.to_thread(self._write_all, entries)
        return True

    async def lease(self, owner: str, ttl_s: float) -> bool:
        if self._lock_fd is not None:
            if self._lock_is_current(self._lock_fd):
                return True
            await self.release(owner)  # a lock on a file that was deleted or replaced: take the new one
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the lock file {self._lock_path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise StoreUnavailable(f"cannot lock {self._lock_path} ({exc.strerror})") from None
        if not self._lock_is_current(fd):  # unlinked between open and flock: a lock nobody else sees
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _lock_is_current(self, fd: int) -> bool:
        """The locked file is still the one at the lock path (a lock on a deleted or replaced file excludes
        nobody: the next process locks the new file)."""
        try:
            held, current = os.fstat(fd), os.stat(self._lock_path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    async def release(self, owner: str) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    async def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        start = self._stat()
        while time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            if self._stat() != start:
                return
            if self._lock_free():
                return

    async def close(self) -> None:
        await self.release("")

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _lock_free(self) -> bool:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)  # released at once: this was only a look
        return True

    def _read_all(self) -> dict[str, Any]:
        try:
            text = self._read_file()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the store file {self._path} ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise StoreUnavailable(f"the store file {self._path} is not an oauth-sidecar store") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise StoreUnavailable(f"the store file {self._path} is not an oauth-sidecar store (format {FORMAT})")
        entries: dict[str, Any] = data["entries"]
        return entries

    def _read_file(self) -> bytes:
        """The file's bytes, read in the event loop: so only a small regular file (a named pipe would wait for
        a writer forever, non-blocking opens it at once; a huge file would take seconds)."""
        fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreUnavailable(f"the store file {self._path} is not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise StoreUnavailable(f"the store file {self._path} is too large for an oauth-sidecar store")
            chunks = []
            while chunk := os.read(fd, MAX_FILE_BYTES + 1):
                chunks.append(chunk)
                if sum(map(len, chunks)) > MAX_FILE_BYTES:  # it grew while being read
                    raise StoreUnavailable(f"the store file {self._path} is too large for an oauth-sidecar store")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write_all(self, entries: dict[str, Any]) -> None:
        """Atomically: a new file (0600) beside the old one, synced, renamed over it."""
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        data = json.dumps({"format": FORMAT, "entries": entries}, separators=(",", ":")).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:  # a full disk makes a write short before it fails: never rename a truncated file
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreUnavailable(f"cannot write the store file {self._path} ({exc.strerror})") from None


# --- the redis backend -----------------------------------------------------------------------------

# KEYS: entry, lease, channel. ARGV: expected version, blob, owner, ttl ms, the new version (compared and
# written as text: Lua's numbers would turn a large counter into "1e+14").
_SWAP = """
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
redis.call('HSET', KEYS[1], 'v', ARGV[5], 'blob', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
"""
# KEYS: entry. ARGV: the largest blob read. Returns version, blob and the server's clock now ('' for what is
# missing; a blob larger than ARGV[1] is not sent: '!').
_LOAD = """
local v = redis.call('HGET', KEYS[1], 'v') or ''
local blob = '!'
if redis.call('HSTRLEN', KEYS[1], 'blob') <= tonumber(ARGV[1]) then blob = redis.call('HGET', KEYS[1], 'blob') or '' end
local now = redis.call('TIME')
return {v, blob, now[1] .. '.' .. string.format('%06d', now[2])}
"""
# KEYS: lease. ARGV: owner, ttl ms. A lease key without an expiry was not set by a sidecar (they always
# expire): it is given one, so that a key set by hand (or a restored dump) does not stop the fleet for good.
_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease, channel. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], 'released')
  return 1
end
return 0
"""


class RedisBackend:
    """Redis or Valkey (standalone, Sentinel or Cluster) through redis-py's asyncio client."""

    kind = "redis"

    def __init__(self, config: StoreConfig, digest: str) -> None:
        import redis.asyncio as aioredis  # imported here: a memory or file store does not need it

        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError, TimeoutError)
        tag = f"{config.prefix}:{{{digest}}}"  # one hash slot for all three (Cluster)
        self._entry, self._lease, self._channel = f"{tag}:entry", f"{tag}:lease", f"{tag}:changed"
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        options: dict[str, Any] = {
            "socket_timeout": REDIS_TIMEOUT_S,
            "socket_connect_timeout": REDIS_TIMEOUT_S,
            "health_check_interval": 15,
            # A pooled connection to a Redis that restarted fails once: reconnect at once, once (a restart costs
            # no write, so the holder's token reaches the new entry). A timeout is not retried: it already
            # waited REDIS_TIMEOUT_S.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }
        if config.username:
            options["username"] = config.username
        if config.password:
            options["password"] = config.password
        if config.ca_file and config.url.startswith("rediss://"):
            options["ssl_ca_certs"] = config.ca_file
        self._pubsub_ok = config.mode != "cluster"
        self._client: Any
        self._sentinel: Any = None
        if config.mode == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) if ":" in h else 26379) for h in config.sentinels]
            service = config.url.split("://", 1)[1].split("/", 1)[0] or "mymaster"
            self._sentinel = Sentinel(hosts, **options)
            self._client = self._sentinel.master_for(service)
        elif config.mode == "cluster":
            from redis.asyncio.cluster import RedisCluster

            self._client = RedisCluster.from_url(config.url, **options)
        else:
            self._client = aioredis.from_url(config.url, **options)
        self._swap = self._client.register_script(_SWAP)
        self._release = self._client.register_script(_RELEASE)
        self._load = self._client.register_script(_LOAD)
        self._take_lease = self._client.register_script(_LEASE)
        self._changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def load(self) -> tuple[int, bytes, float | None] | None:
        version, blob, now = await self._call(self._load(keys=[self._entry], args=[MAX_BLOB_BYTES]))
        if not version and not blob:
            return None
        if blob == b"!":
            raise StoreUnavailable("redis: the stored entry is damaged (too large)")
        try:
            return _version(version), bytes(blob), float(now)
        except ValueError:
            raise StoreUnavailable("redis: the stored entry is damaged (its version is not a counter)") from None

    async def clock(self) -> float | None:
        seconds, micros = await self._call(self._client.time())
        return float(seconds) + float(micros) / 1e6

    async def swap(self, expected: int, blob: bytes, owner: str, ttl_s: float) -> bool:
        ms = int(max(ttl_s, 1.0) * 1000)
        done = await self._call(
            self._swap(
                keys=[self._entry, self._lease, self._channel], args=[str(expected), blob, owner, ms, str(expected + 1)]
            )
        )
        return bool(done == 1)

    async def lease(self, owner: str, ttl_s: float) -> bool:
        self._listen()
        got = await self._call(self._take_lease(keys=[self._lease], args=[owner, max(1, int(ttl_s * 1000))]))
        return got == 1

    async def release(self, owner: str) -> None:
        await self._call(self._release(keys=[self._lease, self._channel], args=[owner]))

    async def wait(self, seconds: float) -> None:
        self._listen()
        self._changed.clear()
        # A notification wakes the waiter at once; the poll catches a lease that simply expired.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), min(seconds, 0.25 if self._pubsub_ok else POLL_S * 2))

    async def close(self) -> None:
        """Bounded: a Redis that stopped answering does not hold the shutdown."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=REDIS_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.aclose(), REDIS_TIMEOUT_S)
        for sentinel in self._sentinel.sentinels if self._sentinel is not None else ():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sentinel.aclose(), REDIS_TIMEOUT_S)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from None

    def _listen(self) -> None:
        if self._pubsub_ok and (self._listener is None or self._listener.done()):
            self._listener = asyncio.get_running_loop().create_task(self._subscribe(), name="store-pubsub")

    async def _subscribe(self) -> None:
        """Keep a subscription to the entry's channel; every message wakes the waiters."""
        while True:
            try:
                pubsub = self._client.pubsub()
                try:
                    await pubsub.subscribe(self._channel)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                        if message is not None:
                            self._changed.set()
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(RETRY_S)  # polling covers the gap; the store's state is tracked elsewhere


# --- what the token manager uses -----------------------------------------------------------------


class SharedStore:
    """An entry shared by a fleet: read, lease, fenced write, wait; with outage tracking."""

    def __init__(
        self,
        backend: Backend,
        sealer: Sealer,
        *,
        lease_s: float,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        retry_s: float = RETRY_S,
        retry_cap_s: float = RETRY_CAP_S,
    ) -> None:
        """``retry_s`` .. ``retry_cap_s``: how long the store is skipped after failing (doubling)."""
        self.backend = backend
        self.kind = backend.kind
        self.lease_s = lease_s
        self.owner = owner or owner_id()
        self._sealer = sealer
        self._clock = clock
        self._wall = wall_clock
        self.available = True
        self.problem = ""
        self._down_until = 0.0
        self._retry_first = retry_s
        self._retry_cap = retry_cap_s
        self._retry_s = retry_s
        self.last_entry: Entry | None = None  # the newest entry read or written (status)
        self.counts = {"reads": 0, "writes": 0, "conflicts": 0, "lease_waits": 0, "errors": 0}
        self.metrics: Any = None  # observability.Metrics, set by the app
        self._releasing: set[asyncio.Task[None]] = set()  # releases after a failure, in the background

    def usable(self) -> bool:
        """Not known to be down, or due for another try."""
        return self.available or self._clock() >= self._down_until

    async def read(self) -> Entry | None:
        entry = await self._guard(self._load(), "read")
        self._count("reads", "read", "ok")
        if entry is not None:
            self.last_entry = entry
        return entry

    async def _load(self) -> Entry | None:
        stored = await self.backend.load()
        if stored is None:
            return None
        version, blob, store_now = stored
        entry = replace(self._sealer.open(blob, version), version=version)
        if store_now is None or not entry.store_written_at:
            return entry
        # The writer's times are on its wall clock, which may be seconds off this host's: move them by the
        # difference, measured as the entry's age on the store's own clock (sealed: not an attacker's to move).
        # A host 30 s behind would otherwise send tokens for 30 s after they expired; one 30 s ahead would
        # renew every token it reads.
        age = max(0.0, store_now - entry.store_written_at)
        return _shifted(entry, self._wall() - age - entry.written_at)

    async def lease(self) -> bool:
        got = bool(await self._guard(self.backend.lease(self.owner, self.lease_s), "lease"))
        self._count("lease_waits" if not got else "", "lease", "ok" if got else "busy")
        return got

    async def release(self) -> None:
        """Give the lease back. When the store just failed, in the background: the flight (and the requests
        waiting for it) does not wait another timeout for it; the lease expires on its own if this fails too."""
        if self.usable():
            await self._release()
            return
        task = asyncio.get_running_loop().create_task(self._release(), name="store-release")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._guard(self.backend.release(self.owner), "release")

    async def write(self, entry: Entry, expected: int) -> Entry | None:
        """The entry as written (version ``expected + 1``), or None when the swap was refused (a newer
        entry, or the lease is no longer ours). Fails at once, without I/O, while the store is known down
        (it failed earlier in this renewal: the renewal waits for it once, not once per command)."""
        if not self.usable():
            raise StoreUnavailable(self.problem or "the store is unavailable")
        store_now = await self._guard(self.backend.clock(), "write")
        entry = replace(
            entry, version=expected + 1, writer=self.owner, written_at=self._wall(), store_written_at=store_now or 0.0
        )
        blob = self._sealer.seal(entry)
        done = await self._guard(self.backend.swap(expected, blob, self.owner, self._ttl(entry)), "write")
        if not done:
            self._count("conflicts", "write", "conflict")
            return None
        self._count("writes", "write", "ok")
        self.last_entry = entry
        return entry

    async def wait(self, seconds: float) -> None:
        await self._guard(self.backend.wait(max(0.0, seconds)), "wait")

    async def close(self) -> None:
        if self._releasing:
            _, pending = await asyncio.wait(set(self._releasing), timeout=REDIS_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.backend.close()

    def status(self) -> dict[str, Any]:
        entry = self.last_entry
        return {
            "kind": self.kind,
            "state": "available" if self.available else "unavailable",
            "problem": self.problem or None,
            "owner": self.owner,
            "version": entry.version if entry else None,
            "last_writer": entry.writer if entry else None,
            "last_written_at": _iso(entry.written_at) if entry and entry.written_at else None,
            "counters": dict(self.counts),
        }

    def _ttl(self, entry: Entry) -> float:
        last = max(entry.expires_at, entry.refresh_expires_at or 0.0, entry.rejected_until)
        if entry.refresh_token and entry.refresh_expires_at is None:
            last = max(last, self._wall() + 30 * 86400.0)  # an offline token: kept for a month
        return max(ENTRY_MIN_TTL_S, last - self._wall() + ENTRY_SLACK_S)

    async def _guard(self, awaitable: Any, op: str) -> Any:
        try:
            result = await awaitable
        except StoreUnavailable as exc:
            self._failed(str(exc))
            self._count("errors", op, "error")
            raise
        if not self.available:
            self.available = True
            self.problem = ""
            self._retry_s = self._retry_first
            event("store.available", kind=self.kind)
        return result

    def _failed(self, problem: str) -> None:
        self._down_until = self._clock() + self._retry_s
        if self.available or problem != self.problem:
            event("store.unavailable", level=logging.WARNING, kind=self.kind, problem=problem, next="local tokens")
        else:
            self._retry_s = min(self._retry_cap, self._retry_s * 2)
        self.available = False
        self.problem = problem

    def _count(self, key: str, op: str, outcome: str) -> None:
        if key:
            self.counts[key] += 1
        if self.metrics is not None:
            self.metrics.store_operations.labels(op, outcome).inc()


def open_store(config: StoreConfig, auth: AuthConfig) -> SharedStore | None:
    """The configured store, or None for ``kind = "memory"``."""
    if config.kind == "memory":
        return None
    digest = config_digest(auth)
    backend: Backend = FileBackend(config.path, digest) if config.kind == "file" else RedisBackend(config, digest)
    lease_s = config.lease_s or auth.timeout_s + 5.0
    return SharedStore(backend, Sealer(config.key, digest), lease_s=lease_s)


def _shifted(entry: Entry, seconds: float) -> Entry:
    """The entry with its wall-clock times moved by ``seconds`` (zero stays zero: "never")."""

    def move(wall: float) -> float:
        return wall + seconds if wall else wall

    return replace(
        entry,
        written_at=move(entry.written_at),
        obtained_at=move(entry.obtained_at),
        expires_at=move(entry.expires_at),
        refresh_expires_at=None if entry.refresh_expires_at is None else move(entry.refresh_expires_at),
        login_at=move(entry.login_at),
        rejected_until=move(entry.rejected_until),
    )


def _version(value: object) -> int:
    """A stored version: a counter (an int, or its decimal digits as text or bytes), else ValueError."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
        value = int(value)
    if type(value) is not int or not 0 < value <= MAX_VERSION:
        raise ValueError("not a version")
    return value


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
