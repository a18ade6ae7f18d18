"""Upstreams that break HTTP/1.1 framing: what a client of the proxy sees, byte for byte.

The upstream is the raw recorder (tests/wire/recorder.py) behind a fresh proxy with one pooled
connection, so a reused connection is visible as the same connection number. The rules: a client
receives only its own exchange's bytes, well framed; a response the proxy could see was malformed (a
second response glued to it, body bytes it may not have, bytes past its end) is never relayed whole
and its connection is never used again.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.wire.client import Conversation, Response, WireRequest, converse
from tests.wire.conftest import REPLAY_LIMIT, Recorded
from tests.wire.recorder import Reply

pytestmark = pytest.mark.asyncio(loop_scope="session")

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nX-Forged: yes\r\n\r\nFORGED-RESPONSE!"
MARKERS = (b"FORGED", b"X-Forged", b"x-forged", b"EXTRA", b"hello world")
LATER_S = 0.15  # after this, bytes the upstream wrote "later" have reached the idle connection


def get(request_id: str, path: str = "/next", **options: object) -> WireRequest:
    return WireRequest("GET", path, request_id, framing="none", **options)  # type: ignore[arg-type]


def assert_clean(*conversations: Conversation) -> None:
    """No client received bytes of an exchange that was not its own."""
    for conversation in conversations:
        for marker in MARKERS:
            assert marker not in conversation.wire, f"a client received {marker!r}: {conversation.wire[:600]!r}"
        assert conversation.trailing == b"", f"bytes after the last response: {conversation.trailing[:300]!r}"


def assert_echo(response: Response | None, request_id: str) -> None:
    assert response is not None, f"no response for {request_id}"
    assert response.status == 200, (response.status, response.reason, response.body[:200])
    assert response.body.startswith(f"echo:{request_id}:".encode()), response.body[:200]


def assert_new_connection(recorded: Recorded, after: str, *request_ids: str) -> None:
    first = recorded.recorder.seen(after).conn
    for request_id in request_ids:
        conn = recorded.recorder.seen(request_id).conn
        assert conn != first, f"{request_id} went on upstream connection {conn}, reused after {after}'s bad response"


async def test_a_response_glued_to_a_204_never_reaches_any_client(recorded: Recorded) -> None:
    """A 204 with a forged second response in the same write: the client gets the bare 204, nobody the forgery."""
    recorded.recorder.script(
        "/no-content", Reply((b"HTTP/1.1 204 No Content\r\nX-Echo-Request-Id: {id}\r\n\r\n" + FORGED,))
    )
    proxy = recorded.proxy
    first = await converse(proxy.port, proxy.host, [WireRequest("DELETE", "/no-content", "nc-1"), get("nc-2")])
    other = await converse(proxy.port, proxy.host, [get("nc-3", close=True)])
    assert_clean(first, other)
    response = first.responses[0]
    assert response is not None
    assert (response.status, response.body) == (204, b""), (response.status, response.reason, response.body)
    assert_echo(first.responses[1], "nc-2")
    assert_echo(other.responses[0], "nc-3")
    assert_new_connection(recorded, "nc-1", "nc-2", "nc-3")


@pytest.mark.parametrize("when", ["same write", "later, on the idle connection"])
async def test_a_body_sent_with_a_head_response_is_never_relayed(recorded: Recorded, when: str) -> None:
    """An upstream that answers HEAD with a body: the client gets the head only, the next request its own answer."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Echo-Request-Id: {id}\r\n\r\n"
    if when == "same write":
        reply = Reply((head + b"hello world",))
    else:
        reply = Reply((head,), later=b"hello world", later_s=0.03)
    recorded.recorder.script("/head", reply)
    proxy = recorded.proxy
    pause = 0.0 if when == "same write" else LATER_S
    first = await converse(
        proxy.port, proxy.host, [WireRequest("HEAD", "/head", "hd-1", framing="none"), get("hd-2")], pause_s=pause
    )
    other = await converse(proxy.port, proxy.host, [get("hd-3", close=True)])
    assert_clean(first, other)
    response = first.responses[0]
    assert response is not None and response.status == 200, response
    assert response.header("x-echo-request-id") == "hd-1"
    assert_echo(first.responses[1], "hd-2")
    assert_echo(other.responses[0], "hd-3")
    assert_new_connection(recorded, "hd-1", "hd-2", "hd-3")


async def test_a_late_head_body_racing_the_next_request_is_never_relayed(recorded: Recorded) -> None:
    """A HEAD body that arrives after the next request went out: that request fails cleanly, nobody sees the bytes."""
    # Waitress 3.0 does this with any WSGI app that returns a body for HEAD. The proxy had already reused the
    # connection when the stray bytes came, so the next request may get a 502; it must never get those bytes.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Echo-Request-Id: {id}\r\n\r\n"
    recorded.recorder.script("/head", Reply((head, b"hello world"), pause_s=0.05))
    proxy = recorded.proxy
    first = await converse(proxy.port, proxy.host, [WireRequest("HEAD", "/head", "hr-1", framing="none"), get("hr-2")])
    other = await converse(proxy.port, proxy.host, [get("hr-3", close=True)])
    assert_clean(first, other)
    response, following = first.responses
    assert response is not None and response.header("x-echo-request-id") == "hr-1", response
    assert following is not None
    if following.status != 502:
        assert_echo(following, "hr-2")
    assert_echo(other.responses[0], "hr-3")
    assert_new_connection(recorded, "hr-1", "hr-3")


@pytest.mark.parametrize("when", ["same write", "later, on the idle connection"])
async def test_bytes_after_a_complete_response_never_reach_a_client(recorded: Recorded, when: str) -> None:
    """Bytes after a complete Content-Length response: the client gets exactly that response, nobody the rest."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo-Request-Id: {id}\r\n\r\nok"
    reply = Reply((ok + FORGED,)) if when == "same write" else Reply((ok,), later=FORGED, later_s=0.03)
    recorded.recorder.script("/glued", reply)
    proxy = recorded.proxy
    pause = 0.0 if when == "same write" else LATER_S
    first = await converse(proxy.port, proxy.host, [get("gl-1", "/glued"), get("gl-2")], pause_s=pause)
    other = await converse(proxy.port, proxy.host, [get("gl-3", close=True)])
    assert_clean(first, other)
    response = first.responses[0]
    assert response is not None
    assert (response.status, response.body) == (200, b"ok"), (response.status, response.body)
    assert_echo(first.responses[1], "gl-2")
    assert_echo(other.responses[0], "gl-3")
    assert_new_connection(recorded, "gl-1", "gl-2", "gl-3")


@pytest.mark.parametrize("writes", [1, 2])
async def test_a_body_longer_than_its_content_length_is_cut_at_its_length(recorded: Recorded, writes: int) -> None:
    """A 200 with more body bytes than its Content-Length: the client gets exactly Content-Length bytes."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Echo-Request-Id: {id}\r\n\r\n"
    body = b"helloEXTRA-BYTES-PAST-THE-END"
    recorded.recorder.script("/long", Reply((head + body,) if writes == 1 else (head, body)))
    proxy = recorded.proxy
    first = await converse(proxy.port, proxy.host, [get("lg-1", "/long"), get("lg-2")])
    other = await converse(proxy.port, proxy.host, [get("lg-3", close=True)])
    assert_clean(first, other)
    response = first.responses[0]
    assert response is not None
    assert (response.status, response.body) == (200, b"hello"), (response.status, response.body)
    assert_echo(first.responses[1], "lg-2")
    assert_echo(other.responses[0], "lg-3")
    assert_new_connection(recorded, "lg-1", "lg-2", "lg-3")


@pytest.mark.parametrize("writes", [1, 2])
async def test_content_length_with_transfer_encoding_is_never_relayed_by_the_wrong_one(
    recorded: Recorded, writes: int
) -> None:
    """A response with both Content-Length and chunked: the client gets the chunked body whole, or a 502."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nX-Echo-Request-Id: {id}\r\n\r\n"
    body = b"b\r\nhello world\r\n0\r\n\r\n"
    recorded.recorder.script("/both", Reply((head + body,) if writes == 1 else (head, body)))
    proxy = recorded.proxy
    first = await converse(proxy.port, proxy.host, [get("bt-1", "/both"), get("bt-2")])
    other = await converse(proxy.port, proxy.host, [get("bt-3", close=True)])
    response = first.responses[0]
    assert response is not None
    # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; refusing such a response is also fine.
    assert (response.status, response.body) in ((200, b"hello world"), (502, response.body)), (
        response.status,
        response.body,
    )
    assert first.trailing == b"" and other.trailing == b"", (first.trailing, other.trailing)
    assert_echo(first.responses[1], "bt-2")
    assert_echo(other.responses[0], "bt-3")
    # ... and the connection is closed after it (same section): the next request goes on a new one.
    assert_new_connection(recorded, "bt-1", "bt-2", "bt-3")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nX-Echo-Request-Id: {id}\r\n\r\n",
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\nX-Echo-Request-Id: {id}\r\n\r\n",
    ],
    ids=["413 keep-alive", "401 close"],
)
async def test_an_early_answer_to_a_streamed_upload_is_relayed_and_its_connection_dropped(
    recorded: Recorded, answer: bytes
) -> None:
    """An upstream that answers before reading a large upload: the client gets that answer, then its next one."""
    closes = b"Connection: close" in answer
    recorded.recorder.script("/early", Reply((answer,), early=True, close=closes))
    proxy = recorded.proxy
    body = bytes(range(256)) * (8 * REPLAY_LIMIT // 256)
    upload = WireRequest("POST", "/early", "ea-1", body=body)
    following = get("ea-2")
    head_and_body = upload.encode(proxy.host)
    quarter = len(head_and_body) // 4
    writes = [head_and_body[i * quarter : (i + 1) * quarter] for i in range(3)]
    writes += [head_and_body[3 * quarter :], following.encode(proxy.host)]
    first = await converse(proxy.port, proxy.host, [upload, following], writes=writes, pause_s=0.02)
    other = await converse(proxy.port, proxy.host, [get("ea-3", close=True)])
    assert_clean(first, other)
    response = first.responses[0]
    assert response is not None
    assert response.status == int(answer[9:12]), (response.status, response.body[:200])
    assert response.header("x-echo-request-id") == "ea-1"
    if first.responses[1] is not None:  # the proxy may also close the client's connection after it
        assert_echo(first.responses[1], "ea-2")
        assert_new_connection(recorded, "ea-1", "ea-2")
    assert_echo(other.responses[0], "ea-3")
    assert_new_connection(recorded, "ea-1", "ea-3")
    early = recorded.recorder.seen("ea-1")
    on_that_connection = [seen.request_id for seen in recorded.recorder.requests if seen.conn == early.conn]
    assert on_that_connection == ["ea-1"], (
        f"requests sent after an early answer on its connection: {on_that_connection}"
    )
    received = bytes(recorded.recorder.received[early.conn])
    assert len(received) <= len(early.head) + len(body), "more bytes than the upload on the early-answered connection"
    assert received[len(early.head) :] == body[: len(received) - len(early.head)], "the upload arrived altered"


async def test_a_well_behaved_upstream_connection_is_reused(recorded: Recorded) -> None:
    """The control case: after a clean response, the proxy's next request reuses the same upstream connection."""
    proxy = recorded.proxy
    first = await converse(proxy.port, proxy.host, [get("ok-1"), get("ok-2")])
    await asyncio.sleep(0.01)
    other = await converse(proxy.port, proxy.host, [get("ok-3", close=True)])
    assert_clean(first, other)
    for response, request_id in zip([*first.responses, *other.responses], ["ok-1", "ok-2", "ok-3"], strict=True):
        assert_echo(response, request_id)
    connections = {recorded.recorder.seen(request_id).conn for request_id in ("ok-1", "ok-2", "ok-3")}
    assert len(connections) == 1, f"a clean keep-alive connection was not reused: {connections}"
