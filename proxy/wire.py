"""HTTP/1.1 framing rules and the state of one upstream connection, without I/O.

Why a module of its own: a credential proxy puts many clients' requests on the same upstream
connections, so every byte must belong to exactly one exchange. The one defect that let a client
capture the token came from deriving a request's framing from its bytes (``b"chunked" in head``)
far from where the request was parsed. Here, framing is a value decided once:

- for a request, by the forwarder from aiohttp's parse of the client's request
  (:func:`request_framing`), carried to the pool and written as one header by :meth:`Framing.header`;
- for a response, by :func:`response_framing` from the response head (RFC 9112 §6.3), strictly:
  anything ambiguous (Content-Length beside Transfer-Encoding, a transfer coding other than
  chunked, an unreadable length) is refused, never guessed.

Theory of operation, in the manner of h11's ``_state.py``: an upstream connection carries one
exchange at a time and tracks each direction as a :class:`Phase`::

    request  (ours):    IDLE --head--> SEND_BODY --end--> DONE
                        IDLE --head without body--------> DONE
    response (theirs):  IDLE --1xx--> IDLE
                        IDLE --head--> SEND_BODY --end--> DONE
                        IDLE --head without body--------> DONE
    either, until DONE: --fail--> ERROR     (a cut or short body, a protocol error, a timeout, ...)

Every other pair is illegal and raises :class:`WireError`. A connection is reusable only when both
directions are DONE, both sides allowed keep-alive, and not one byte past the response arrived
(:meth:`ExchangeState.reusable`); then :meth:`ExchangeState.next_cycle` starts the next exchange.
What moves the phases (writes, llhttp's callbacks, the connection closing) lives in
``proxy/upstream.py``; what the phases allow lives here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# RFC 9110 §7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


class WireError(Exception):
    """An illegal framing or phase change: a bug in the caller or a peer that broke HTTP/1.1."""


class Body(enum.Enum):
    """How a message's body is delimited."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # exactly ``length`` bytes (Content-Length)
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    UNTIL_CLOSE = "until_close"  # a response read until the connection closes (RFC 9112 §6.3 rule 8)

    # Members are singletons compared by identity: hash them so too. Enum's own __hash__ is Python code
    # (hash of the name), and every exchange looks these up several times (Framing, TRANSITIONS).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Framing:
    body: Body
    length: int = 0

    def header(self) -> bytes:
        """The framing header line for a request head (b"" for no body)."""
        if self.body is Body.LENGTH:
            return b"Content-Length: %d\r\n" % self.length
        if self.body is Body.CHUNKED:
            return b"Transfer-Encoding: chunked\r\n"
        if self.body is Body.UNTIL_CLOSE:
            raise WireError("a request cannot be delimited by closing the connection")
        return b""

    @property
    def has_body(self) -> bool:
        return self.body is not Body.NONE and not (self.body is Body.LENGTH and self.length == 0)


NO_BODY = Framing(Body.NONE)
CHUNKED = Framing(Body.CHUNKED)
UNTIL_CLOSE = Framing(Body.UNTIL_CLOSE)
EMPTY = Framing(Body.LENGTH, 0)  # "Content-Length: 0": what a body method sends without a body


def length(n: int) -> Framing:
    if n < 0:
        raise WireError("a Content-Length cannot be negative")
    return Framing(Body.LENGTH, n)


# Methods whose requests are expected to carry a body: sent with Content-Length: 0 when empty
# (RFC 9110 §8.6: a user agent SHOULD send it for these even when there is no body).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_framing(
    method: str, *, has_body: bool, content_length: int | None, transfer_encoding: str | None
) -> Framing:
    """The framing of the request the proxy sends upstream, from the client's request as aiohttp parsed it.

    ``transfer_encoding``: the client's ``Transfer-Encoding`` (None when absent); ``content_length``: its
    ``Content-Length``. A request that claims both is ambiguous and refused (aiohttp's parser already
    refuses it; this is the second lock on the same door), and so is a transfer coding other than
    chunked alone: aiohttp removes only the chunked framing, and relaying ``gzip, chunked`` re-chunked
    would hand the upstream gzip bytes as plain content.
    """
    if transfer_encoding is not None:
        if content_length is not None:
            raise WireError("a request with both Content-Length and Transfer-Encoding is ambiguous")
        if transfer_encoding.strip().lower() != "chunked":
            raise WireError("transfer codings other than chunked are not forwarded")
        return CHUNKED
    if content_length is not None and (has_body or content_length == 0):
        return length(content_length)
    if has_body:  # a body with neither header cannot be delimited: aiohttp never produces one
        raise WireError("a request body without Content-Length or Transfer-Encoding")
    return EMPTY if method in BODY_METHODS else NO_BODY


def response_framing(
    method: str, status: int, content_length: bytes | None, transfer_encoding: bytes | None
) -> Framing:
    """How the body of a final (non-1xx) response is delimited (RFC 9112 §6.3), or WireError.

    ``content_length`` and ``transfer_encoding``: the header values as received (llhttp has refused
    duplicate Content-Length fields already), None when absent.
    """
    if method == "HEAD" or status in (204, 304):
        return NO_BODY  # whatever the head says (RFC 9112 §6.3 rules 1-2)
    if transfer_encoding is not None:
        if content_length is not None:
            # Rule 3 says Transfer-Encoding wins, "and ought to be handled as an error": a response that
            # two parsers could split in two different places is not relayed.
            raise WireError("the response has both Content-Length and Transfer-Encoding")
        codings = [coding.strip().lower() for coding in transfer_encoding.split(b",")]
        if codings != [b"chunked"]:
            # Another transfer coding (gzip, chunked) would have to be decoded here before re-framing; like
            # h11, the proxy supports chunked alone rather than relay bytes it cannot delimit or describe.
            raise WireError("the response uses a transfer coding other than chunked")
        return CHUNKED
    if content_length is not None:
        text = content_length.strip()
        if not text.isdigit() or len(text) > 18:
            raise WireError("the response has an invalid Content-Length")
        return length(int(text))
    return UNTIL_CLOSE


def head_response_reusable(content_length: bytes | None, transfer_encoding: bytes | None) -> bool:
    """May a connection be reused after this response to HEAD? Only when its head announces no body.

    A response to HEAD has no body whatever its head says, but servers exist that send one anyway
    (waitress 3 does when the application returns a body); when those bytes arrive after the
    connection went back to the pool, the next request would read them as its response. The proxy
    cannot wait for bytes that should never come, so it does not reuse such a connection."""
    if transfer_encoding is not None:
        return False
    return content_length is None or content_length.strip() in (b"0", b"")


def persistent(version: str, connection: bytes | None) -> bool:
    """Whether a message leaves its connection open (RFC 9112 §9.3): HTTP/1.1 unless ``Connection:
    close``; HTTP/1.0 only with ``Connection: keep-alive``."""
    tokens = {token.strip().lower() for token in connection.split(b",")} if connection else set()
    if version == "1.1":
        return b"close" not in tokens
    return version == "1.0" and b"keep-alive" in tokens


class Phase(enum.Enum):
    """Where one direction of the current exchange is."""

    IDLE = "idle"  # request: nothing sent yet; response: waiting for the (final) head
    SEND_BODY = "send_body"  # the body is on its way
    DONE = "done"  # this direction's message is complete
    ERROR = "error"  # this exchange failed; the connection must close

    __hash__ = object.__hash__  # as Body's


class Event(enum.Enum):
    HEAD = "head"  # a head whose framing announces a body
    HEAD_WITHOUT_BODY = "head_without_body"
    INFORMATIONAL = "informational"  # a 1xx response head (103 Early Hints, a stray 100 Continue)
    END = "end"  # the last body byte
    FAIL = "fail"

    __hash__ = object.__hash__  # as Body's


TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.IDLE: {
        Event.HEAD: Phase.SEND_BODY,
        Event.HEAD_WITHOUT_BODY: Phase.DONE,
        Event.INFORMATIONAL: Phase.IDLE,
        Event.FAIL: Phase.ERROR,
    },
    Phase.SEND_BODY: {Event.END: Phase.DONE, Event.FAIL: Phase.ERROR},
    Phase.DONE: {},  # final for this exchange; ExchangeState.next_cycle starts the next one
    Phase.ERROR: {Event.FAIL: Phase.ERROR},
}


def step(phase: Phase, event: Event) -> Phase:
    try:
        return TRANSITIONS[phase][event]
    except KeyError:
        raise WireError(f"{event.value} is not allowed while {phase.value}") from None


class ExchangeState:
    """Both directions of one upstream connection's current exchange, and whether it may be reused."""

    __slots__ = ("keep_alive", "request", "request_framing", "response", "response_framing")

    def __init__(self) -> None:
        self.request = Phase.IDLE
        self.response = Phase.IDLE
        self.request_framing = NO_BODY
        self.response_framing = NO_BODY
        self.keep_alive = True  # cleared for good by either side's "close", an early answer, a failure

    def send_head(self, framing: Framing) -> None:
        if self.response is not Phase.IDLE:
            raise WireError("a request head on a connection whose last response is not finished")
        self.request_framing = framing
        self.request = step(self.request, Event.HEAD if framing.has_body else Event.HEAD_WITHOUT_BODY)

    def request_ended(self) -> None:
        self.request = step(self.request, Event.END)

    def informational(self) -> None:
        self.response = step(self.response, Event.INFORMATIONAL)

    def response_head(self, framing: Framing, keep_alive: bool) -> None:
        """A final response head. Answered before the request body was all sent (an early 413 or 401),
        the connection is not reused: what the upstream made of the rest of the body is unknown."""
        if self.request is Phase.IDLE:
            raise WireError("a response before any request")
        body = framing.body is Body.UNTIL_CLOSE or framing.has_body
        self.response = step(self.response, Event.HEAD if body else Event.HEAD_WITHOUT_BODY)
        self.response_framing = framing
        if not keep_alive or framing.body is Body.UNTIL_CLOSE or self.request is not Phase.DONE:
            self.keep_alive = False

    def response_ended(self) -> None:
        self.response = step(self.response, Event.END)

    def abort(self) -> None:
        """The exchange cannot go on (a cut or short body, a protocol error, a timeout, the connection
        closed early): every direction that is not DONE ends in ERROR, and the connection must close.
        A response that was already whole stays whole: the reader still gets all of it."""
        self.keep_alive = False
        if self.request is not Phase.DONE:
            self.request = step(self.request, Event.FAIL)
        if self.response is not Phase.DONE:
            self.response = step(self.response, Event.FAIL)

    def abandon_request(self) -> None:
        """Our body stops before its end because the answer came first (an early 413): the response goes
        on; the connection is not reused."""
        self.request = step(self.request, Event.FAIL)
        self.keep_alive = False

    def extra_bytes(self) -> None:
        """Bytes from the upstream past the end of its response: never relayed, and the connection is
        not reused (they could only be a desynchronised or forged next response)."""
        self.keep_alive = False

    def connection_closed(self) -> None:
        """The upstream closed the connection: ends a body delimited by the close, fails anything unfinished."""
        self.keep_alive = False
        if self.response is Phase.SEND_BODY and self.response_framing.body is Body.UNTIL_CLOSE:
            self.response = step(self.response, Event.END)
        if self.request is not Phase.IDLE or self.response is not Phase.IDLE:  # not an idle connection
            self.abort()

    @property
    def failed(self) -> bool:
        return self.response is Phase.ERROR or self.request is Phase.ERROR

    def reusable(self) -> bool:
        return self.keep_alive and self.request is Phase.DONE and self.response is Phase.DONE

    def next_cycle(self) -> None:
        """Start the next exchange on this connection; only from a reusable state."""
        if not self.reusable():
            raise WireError(f"not reusable (request {self.request.value}, response {self.response.value})")
        self.request = self.response = Phase.IDLE
        self.request_framing = self.response_framing = NO_BODY
