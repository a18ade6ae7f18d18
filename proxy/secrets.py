"""Secrets that rotate under a running process: the values in force, and the watcher that re-reads their files.

Theory of operation
-------------------
Any secret may come from a file (``<key>_file``, ``OAUTH_SIDECAR_<SECTION>_<KEY>_FILE``;
``Config.secret_files``). Kubernetes updates a mounted Secret in place: it writes the new files into a new
timestamped directory and swaps the ``..data`` symlink, so the path in the configuration stays and what it
resolves to changes; Docker secrets, systemd credentials and Vault Agent rewrite plain files. None of them
sends a signal, and inotify would see the symlink swap only on the directory. So every ``POLL_INTERVAL_S``
the :class:`SecretWatcher` stats each file, following the symlinks, and compares what it resolves to and
the file's identity (device, inode, size, modification and change times) with its last look. A file that
changed is read again; so is every file once the provider has refused the credentials (a rewrite within
one clock tick can leave the stat as it was), and on SIGHUP (:meth:`SecretWatcher.reload`).

A new value is put in force as a whole: :class:`Secrets` holds a :class:`~proxy.config.Config`, replaced
by one assignment, and whoever sends a secret reads it there when it sends it (``idp.IdentityProvider``
for the token endpoint; ``access.Guard`` is handed the new ``access.api_key``). The log redactor learns a
new value before it is in force and keeps the old one: lines about requests sent with it may still come.
A file that cannot be read, is empty, too large or not a regular file keeps the last good value, said once
(``secret.unreadable``, never the value).

What the token manager does about a change is ``state.on_credentials_changed``'s decision: credentials
the provider refused are tried again at once, not after minutes of backoff (logins stay
``state.MIN_LOGIN_INTERVAL_S`` apart).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from .config import AuthConfig, Config, check_secret, read_secret
from .observability import Redactor, event

# The key of a static header's value read from [inject] headers_file: "inject.headers.NAME".
HEADER_KEY = "inject.headers."
# How often the files are looked at. The kubelet takes up to a minute or two to update a mounted Secret;
# a second more is nothing, and a stat a second per file costs nothing.
POLL_INTERVAL_S = 1.0

Stamp = tuple[str, int, int, int, int, int]


class Secrets:
    """The configuration with the secret values in force now; replaced as a whole, never changed."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def auth(self) -> AuthConfig:
        return self.config.auth

    def value(self, key: str) -> str:
        """The value of the secret ``key`` ("auth.password", "inject.headers.NAME") in force."""
        if key.startswith(HEADER_KEY):
            return self.config.inject.headers.get(key[len(HEADER_KEY) :], "")
        section, _, name = key.partition(".")
        value: str = getattr(getattr(self.config, section), name)
        return value

    def put(self, values: Mapping[str, str]) -> None:
        """Put ``values`` ("auth.password" -> value) in force, all at once."""
        by_section: dict[str, dict[str, Any]] = {}
        headers = {key[len(HEADER_KEY) :]: value for key, value in values.items() if key.startswith(HEADER_KEY)}
        if headers:
            by_section["inject"] = {"headers": MappingProxyType({**self.config.inject.headers, **headers})}
        for key, value in values.items():
            if key.startswith(HEADER_KEY):
                continue
            section, _, name = key.partition(".")
            by_section.setdefault(section, {})[name] = value
        config = self.config
        for section, changes in by_section.items():
            config = replace(config, **{section: replace(getattr(config, section), **changes)})
        self.config = config


def stamp(path: str) -> Stamp | None:
    """What says the file at ``path`` changed: the file its symlinks resolve to, and that file's identity.
    None when it cannot be looked at."""
    try:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except (OSError, ValueError):
        return None


class SecretWatcher:
    """Reads the secret files again when they change, when the credentials were refused, and on SIGHUP.

    ``on_change`` gets the keys whose values changed, after they are in force; ``refusals`` is a counter
    that grows each time the provider refuses the credentials (``TokenManager.counts["rejections"]``).
    """

    def __init__(
        self,
        secrets: Secrets,
        *,
        redactor: Redactor | None = None,
        on_change: Callable[[tuple[str, ...]], None] = lambda keys: None,
        refusals: Callable[[], int] = lambda: 0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        self._secrets = secrets
        self._files = dict(secrets.config.secret_files)
        self._redactor = redactor
        self._on_change = on_change
        self._refusals = refusals
        self._seen_refusals = refusals()
        self._sleep = sleep
        self._interval = interval
        self._stamps: dict[str, Stamp | None] = {}  # none yet: the first look reads every file
        # The keys that changed lately, and for how many more looks a refusal may still be news for them: a
        # login built before the change can be refused after it, for up to auth.timeout_s.
        self._recent: tuple[str, ...] = ()
        self._recent_looks = 0
        self._horizon = math.ceil(secrets.auth.timeout_s / interval) + 1
        self.problems: dict[str, str] = {}  # key -> why its file keeps the last good value

    @property
    def files(self) -> Mapping[str, str]:
        """Key -> file, for every secret read from a file."""
        return self._files

    def poll(self) -> tuple[str, ...]:
        """One look: the files that changed are read again (all of them once the credentials were refused
        since the last look). The keys whose values changed."""
        refusals = self._refusals()
        refused = refusals != self._seen_refusals
        self._seen_refusals = refusals
        recent = self._recent if self._recent_looks > 0 else ()
        self._recent_looks -= 1
        changed = self._look(everything=refused)
        if refused and recent and not changed:
            # The refused login may have carried the values from before the change: tell again, once.
            self._recent = ()
            self._on_change(recent)
        return changed

    def reload(self) -> tuple[str, ...]:
        """Read every secret file again (SIGHUP) and say so: ``sidecar.reloaded``. Never raises (it runs
        as a signal handler)."""
        try:
            changed = self._look(everything=True)
        except Exception as exc:
            _crashed(exc)
            return ()
        event(
            "sidecar.reloaded",
            files=len(self._files),
            changed=",".join(changed) or "none",
            kept=",".join(sorted(self.problems)) or "none",
        )
        return changed

    async def run(self) -> None:
        """Look every ``interval`` until cancelled."""
        while True:
            await self._sleep(self._interval)
            try:
                self.poll()
            except Exception as exc:
                _crashed(exc)

    def _look(self, everything: bool) -> tuple[str, ...]:
        new: dict[str, str] = {}
        for key, path in self._files.items():
            now = stamp(path)
            if not everything and key in self._stamps and key not in self.problems and now == self._stamps[key]:
                continue
            self._stamps[key] = now
            value = self._read(key, path)
            if value is not None and value != self._secrets.value(key):
                new[key] = value
        if not new:
            return ()
        if self._redactor is not None:  # before the value is in force: a line logged with it is already masked
            self._redactor.add(new.values())
        self._secrets.put(new)
        for key in new:
            event("secret.rotated", key=key, file=self._files[key])
        changed = tuple(new)
        self._recent, self._recent_looks = changed, self._horizon
        self._on_change(changed)
        return changed

    def _read(self, key: str, path: str) -> str | None:
        """The file's value, or None (logged once per problem) when the last good value must stay."""
        try:
            value = read_secret(path, regular_only=True)
        except OSError as exc:
            problem = f"cannot read it ({exc.strerror or type(exc).__name__})"
        except ValueError as exc:
            problem = str(exc)
        else:
            problem = check_secret(key, value) or ("" if value else "empty")
            if not problem:
                if self.problems.pop(key, None) is not None:
                    event("secret.readable", key=key, file=path)
                return value
        if self.problems.get(key) != problem:
            self.problems[key] = problem
            event(
                "secret.unreadable",
                level=logging.WARNING,
                key=key,
                file=path,
                problem=problem,
                detail="the last good value stays in force",
            )
        return None


def _crashed(exc: Exception) -> None:
    """A bug in watching: logged by type and place, never its message (it could quote a value)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
    event("secret.watch_failed", level=logging.ERROR, error=type(exc).__name__, where=where)
