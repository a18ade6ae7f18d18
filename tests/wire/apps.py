"""The echo app every real upstream server runs: one WSGI and one ASGI flavour of the same behaviour.

Each request is answered with what the server's own HTTP parser made of it: method, raw target, a few
headers, the body's length and sha256, and a per-process counter; the same facts go in ``X-Echo-*``
response headers (so a HEAD response carries them too) and, as one JSON line, in the file named by
``$WIRE_LOG``, which the tests read to count what reached the upstream. The Authorization header is
reported only as present or absent: the injected token is never written anywhere.

Loaded by the server subprocesses (``python -m gunicorn tests.wire.apps:wsgi`` ...), so it imports
nothing from the proxy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

SELECTED = ("host", "content-length", "transfer-encoding", "x-request-id", "x-note", "connection", "expect")
_counter = itertools.count(1)
_lock = threading.Lock()
_log_fd: int | None = None


def _log(record: dict[str, Any]) -> None:
    global _log_fd
    path = os.environ.get("WIRE_LOG")
    if not path:
        return
    with _lock:
        if _log_fd is None:
            _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(_log_fd, (json.dumps(record) + "\n").encode())


def _answer(method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    with _lock:
        count = next(_counter)
    record = {
        "id": headers.get("x-request-id", ""),
        "method": method,
        "target": target,
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "starts": body[:20].decode("latin-1"),  # a body that arrived chunk-encoded shows it here
        "count": count,
        "pid": os.getpid(),
        "headers": {name: headers[name] for name in SELECTED if name in headers},
        "authorization": "authorization" in headers,
    }
    _log(record)
    payload = json.dumps(record).encode()
    response_headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("X-Echo-Request-Id", headers.get("x-request-id", "")),
        ("X-Echo-Method", method),
        ("X-Echo-Length", str(len(body))),
        ("X-Echo-Sha256", str(record["sha256"])),
        ("X-Echo-Count", str(count)),
    ]
    return response_headers, payload


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """WSGI flavour (gunicorn, waitress)."""
    stream = environ["wsgi.input"]
    parts = []
    while True:
        part = stream.read(65536)
        if not part:
            break
        parts.append(part)
    body = b"".join(parts)
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    response_headers, payload = _answer(environ["REQUEST_METHOD"], target, headers, body)
    start_response("200 OK", response_headers)
    # Waitress (3.0) sends whatever the app returns, HEAD or not (frameworks such as werkzeug return nothing for
    # HEAD); a HEAD body arriving late makes the next response on that connection unreadable, a case of its own
    # in test_misbehaving_upstream.py, kept out of these tests so they stay deterministic.
    return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [payload]


async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """ASGI flavour (uvicorn, hypercorn)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
    response_headers, payload = _answer(scope["method"], target, headers, body)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.encode(), v.encode("latin-1")) for k, v in response_headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})
