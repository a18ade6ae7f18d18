"""proxy/wire.py: framing decisions and the per-connection exchange state, without I/O."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamUnreachable
from proxy.response import AIOHTTP_INTERNALS, AIOHTTP_REQUEST_INTERNALS
from proxy.upstream import Pool
from proxy.wire import (
    CHUNKED,
    EMPTY,
    NO_BODY,
    UNTIL_CLOSE,
    ExchangeState,
    Phase,
    WireError,
    length,
    request_framing,
    response_framing,
)


def test_request_framing_comes_from_the_parsed_request():
    """Content-Length, chunked, Content-Length: 0 for body methods, nothing for the rest; both, or a
    transfer coding other than chunked, is refused."""
    assert request_framing("POST", has_body=True, content_length=10, transfer_encoding=None) == length(10)
    assert request_framing("POST", has_body=True, content_length=None, transfer_encoding="chunked") == CHUNKED
    assert request_framing("POST", has_body=False, content_length=None, transfer_encoding=None) == EMPTY
    assert request_framing("GET", has_body=False, content_length=None, transfer_encoding=None) == NO_BODY
    assert request_framing("GET", has_body=False, content_length=0, transfer_encoding=None) == length(0)
    with pytest.raises(WireError, match="both"):
        request_framing("POST", has_body=True, content_length=10, transfer_encoding="chunked")
    with pytest.raises(WireError, match="other than chunked"):
        request_framing("POST", has_body=True, content_length=None, transfer_encoding="gzip, chunked")
    assert CHUNKED.header() == b"Transfer-Encoding: chunked\r\n"
    assert length(7).header() == b"Content-Length: 7\r\n"
    assert NO_BODY.header() == b""


@pytest.mark.parametrize(
    ("method", "status", "cl", "te", "expected"),
    [
        ("HEAD", 200, b"1000", None, NO_BODY),
        ("GET", 204, None, None, NO_BODY),
        ("GET", 304, b"50", None, NO_BODY),
        ("GET", 200, b"12", None, length(12)),
        ("GET", 200, b" 0 ", None, length(0)),
        ("GET", 200, None, b"chunked", CHUNKED),
        ("GET", 200, None, b"Chunked ", CHUNKED),
        ("GET", 200, None, None, UNTIL_CLOSE),
    ],
)
def test_response_framing_follows_rfc_9112(method, status, cl, te, expected):
    """How a response body ends, from its request method, status and head (RFC 9112 §6.3)."""
    assert response_framing(method, status, cl, te) == expected


@pytest.mark.parametrize(
    ("cl", "te"),
    [
        (b"5", b"chunked"),
        (None, b"gzip, chunked"),
        (None, b"chunked, chunked"),
        (None, b"identity"),
        (b"-1", None),
        (b"1e3", None),
        (b"9" * 30, None),
    ],
)
def test_ambiguous_response_framing_is_refused(cl, te):
    """Anything two parsers could read two ways is an error, never a guess."""
    with pytest.raises(WireError):
        response_framing("GET", 200, cl, te)


TWO = length(2)


def _cycle(state: ExchangeState, request=NO_BODY, response=TWO, keep_alive=True) -> None:
    state.send_head(request)
    if request.has_body:
        state.request_ended()
    state.response_head(response, keep_alive=keep_alive)
    if state.response is Phase.SEND_BODY:
        state.response_ended()


def test_a_finished_exchange_is_reusable_and_starts_the_next_cycle():
    """Both directions DONE with keep-alive: reusable; next_cycle resets to IDLE."""
    state = ExchangeState()
    _cycle(state, request=length(5))
    assert state.reusable()
    state.next_cycle()
    assert (state.request, state.response) == (Phase.IDLE, Phase.IDLE)
    _cycle(state)
    assert state.reusable()


@pytest.mark.parametrize(
    "spoil",
    [
        lambda s: s.extra_bytes(),  # bytes past the response
        lambda s: s.connection_closed(),
        lambda s: s.abort(),
    ],
    ids=["extra-bytes", "closed", "aborted"],
)
def test_a_spoiled_connection_is_never_reused(spoil):
    """After bytes past the response, a close or an abort, a whole response stays whole but the
    connection is not reusable, and next_cycle refuses."""
    state = ExchangeState()
    _cycle(state)
    spoil(state)
    assert state.response is Phase.DONE
    assert not state.reusable()
    with pytest.raises(WireError):
        state.next_cycle()


def test_an_early_answer_makes_the_connection_single_use():
    """A response head while our body is still going: the exchange goes on, the connection is not reused."""
    state = ExchangeState()
    state.send_head(length(10))
    state.response_head(length(3), keep_alive=True)
    state.response_ended()
    state.request_ended()
    assert not state.reusable()


def test_a_close_delimited_body_ends_with_the_close_and_anything_unfinished_fails():
    """UNTIL_CLOSE ends at the close; a Content-Length body cut by the close is an ERROR."""
    state = ExchangeState()
    state.send_head(NO_BODY)
    state.response_head(UNTIL_CLOSE, keep_alive=True)
    state.connection_closed()
    assert state.response is Phase.DONE and not state.reusable()

    state = ExchangeState()
    state.send_head(NO_BODY)
    state.response_head(length(10), keep_alive=True)
    state.connection_closed()
    assert state.response is Phase.ERROR and state.failed


def test_illegal_orders_raise():
    """A response before a request, a second head, or a request on an unfinished connection are bugs."""
    state = ExchangeState()
    with pytest.raises(WireError):
        state.response_head(length(1), keep_alive=True)
    state.send_head(NO_BODY)
    with pytest.raises(WireError):
        state.request_ended()  # a bodiless request is DONE at its head
    state.response_head(length(1), keep_alive=True)
    with pytest.raises(WireError):
        state.response_head(length(1), keep_alive=True)
    with pytest.raises(WireError):
        state.send_head(NO_BODY)


EVENTS = ["send_head", "request_ended", "informational", "response_head", "response_ended", "extra", "closed", "abort"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.booleans(), st.sampled_from([NO_BODY, length(3), CHUNKED]))))
def test_no_sequence_of_events_makes_a_bad_connection_reusable(events):
    """Whatever order events come in, reusable means: both directions DONE, keep-alive on both sides,
    no early answer, nothing past the response, no close and no abort."""
    state = ExchangeState()
    spoiled = early = False
    closed_keep_alive = True
    for name, flag, framing in events:
        try:
            if name == "send_head":
                state.send_head(framing)
            elif name == "request_ended":
                state.request_ended()
            elif name == "informational":
                state.informational()
            elif name == "response_head":
                early = early or state.request is not Phase.DONE
                state.response_head(framing, keep_alive=flag)
                closed_keep_alive = closed_keep_alive and flag
            elif name == "response_ended":
                state.response_ended()
            elif name == "extra":
                state.extra_bytes()
                spoiled = True
            elif name == "closed":
                state.connection_closed()
                spoiled = True
            else:
                state.abort()
                spoiled = True
        except WireError:
            continue
    if state.reusable():
        assert state.request is Phase.DONE and state.response is Phase.DONE
        assert not spoiled and not early and closed_keep_alive


class _Short:
    """A client body stream that ends after ``size`` bytes whatever its Content-Length said."""

    def __init__(self, size: int) -> None:
        self._left = size

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        # 150-byte pieces: the one that runs past 200 crosses the line, so the upstream never has 200 bytes.
        part, self._left = b"x" * min(self._left, 150), max(0, self._left - 150)
        return part


@pytest.mark.parametrize("size", [50, 500])
async def test_a_streamed_body_that_does_not_match_its_length_fails_and_closes(raw_server, size):
    """A stream that ends before its Content-Length (50 of 200) or would run past it (500 of 200) never
    reaches the upstream as a complete request, and its connection is not reused."""
    seen: list[bytes] = []

    async def upstream(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            body = await reader.readexactly(200) if head.startswith(b"POST") else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    pool = Pool(await raw_server(upstream), limit=1, connect_timeout_s=1, timeout_s=2, ssl_context=None)
    head = b"POST /x HTTP/1.1\r\nHost: u\r\nContent-Length: 200\r\n\r\n"
    with pytest.raises(UpstreamUnreachable, match="Content-Length"):
        await pool.request("POST", head, _Short(size), framing=length(200))
    assert pool.open_connections == 0
    exchange = await pool.request("GET", b"GET /y HTTP/1.1\r\nHost: u\r\n\r\n", None)
    assert exchange.status == 200
    exchange.release()
    await pool.close()


def test_aiohttp_still_has_what_relay_response_overrides():
    """proxy/response.py overrides StreamResponse internals: an aiohttp release that renames them fails here."""
    response = web.StreamResponse()
    missing = [
        name for name in AIOHTTP_INTERNALS if not hasattr(response, name) and not hasattr(web.StreamResponse, name)
    ]
    assert missing == [], f"aiohttp's StreamResponse no longer has {missing}: proxy/response.py must be updated"
    request = make_mocked_request("GET", "/")
    missing = [name for name in AIOHTTP_REQUEST_INTERNALS if not hasattr(request, name)]
    assert missing == [], f"aiohttp's BaseRequest no longer has {missing}: proxy/response.py must be updated"
