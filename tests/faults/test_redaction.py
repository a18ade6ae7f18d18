"""No secret in logs, status, metrics or error bodies; and a redaction net under the logs in case one slips.

The cycle test runs login, forward, refresh, a failed refresh, a rejected refresh and a rejected login at
debug level, in both log formats, and looks for every secret value: the password, the client secret,
the API key, and every access and refresh token the identity provider issued. It checks the records
as they were logged (before redaction: never logged in the first place) and the formatted output; and,
without the capture of records, the output of the access lines the proxy writes directly.
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy.demo import Fault
from proxy.observability import (
    LOGGER_NAME,
    MASK,
    JsonFormatter,
    RedactingFilter,
    Redactor,
    TextFormatter,
    flush_access_log,
    log,
    setup_logging,
)
from proxy.state import fingerprint
from tests.fakes.servers import QUICK_LOGINS, keycloak_config, start_api, start_idp, start_proxy
from tests.faults.conftest import API_KEY, CLIENT_SECRET, PASSWORD, manager, wait_for

# A second login waits 50 ms, not 1 s: no test here is about the login spacing.

# Shaped like a real JWT (header.payload.signature, base64url); never issued by anyone.
FAKE_JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ0ZXN0LXVzZXIiLCJleHAiOjE5OTk5OTk5OTl9."
    "c2lnbmF0dXJlLW5vdC1yZWFsLWF0LWFsbA"
)
EXPECTED_EVENTS = {
    "token.obtained",
    "token.rejected_upstream",
    "token.unavailable",
    "token.refresh_rejected",
    "token.login_rejected",
    "request",
}


class RawCapture(logging.Handler):
    """Keeps each record's text and fields as logged, before any handler's filter rewrites them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.getMessage())
        parts = [record.getMessage(), repr(getattr(record, "fields", {}))]
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        self.texts.append(" ".join(parts))


def _capture(fmt: str, secrets: list[str], raw_records: bool = True) -> tuple[io.StringIO, RawCapture]:
    """Log to a buffer; with ``raw_records``, also keep every record as logged. (A handler beside the
    buffer's makes the access line a record too; without one, the proxy writes it directly.)"""
    stream = io.StringIO()
    setup_logging("debug", fmt, secrets, stream=stream)
    raw = RawCapture()
    for name in (LOGGER_NAME, "aiohttp") if raw_records else ():
        logging.getLogger(name).handlers.insert(0, raw)  # first: sees records before redaction
    return stream, raw


@pytest.mark.parametrize("raw_records", [True, False], ids=["records", "direct_access_lines"])
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_full_cycle_logs_no_secret(aiohttp_server, aiohttp_client, fmt, raw_records):
    """Login, forward, refresh, failures and rejections at debug level: no secret value anywhere."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD}, clients={"demo-client": CLIENT_SECRET})
    _api, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(
        idp,
        api_url,
        auth={"password": PASSWORD, "client_secret": CLIENT_SECRET},
        access={"api_key": API_KEY},
        log={"level": "debug", "format": fmt},
    )
    stream, raw = _capture(fmt, config.secrets(), raw_records)
    client = await start_proxy(aiohttp_client, config, rejection_renewal_interval_s=0.0, **QUICK_LOGINS)
    key = {"X-Api-Key": API_KEY}
    issued: set[str] = set()

    def collect() -> None:
        issued.update(idp.access, idp.refresh, idp.used_refresh)

    outputs: list[str] = []

    async def fetch(path: str) -> int:
        resp = await client.get(path, headers=key)
        outputs.append(await resp.text())
        outputs.extend(f"{k}: {v}" for k, v in resp.headers.items())
        return resp.status

    # Login and forward.
    assert await fetch("/v1/hello") == 200
    collect()
    # The upstream stops accepting the token: refresh, retry.
    idp.revoke_all_access()
    assert await fetch("/v1/hello") == 200
    collect()
    # A refresh that fails (500), then the scheduler's retry succeeds.
    idp.fail_next(Fault(500, body={"error": "unknown_error", "error_description": "database is down"}))
    idp.revoke_all_access()
    await fetch("/v1/hello")
    await wait_for(lambda: manager(client).counts["refreshes"] >= 2)
    collect()
    # A dead refresh token and rejected credentials: refresh_rejected, then login_rejected; then recovery.
    idp.fail_next(
        Fault(400, body={"error": "invalid_grant", "error_description": "Token is not active"}),
        Fault(401, body={"error": "invalid_client", "error_description": "Invalid client credentials"}),
    )
    idp.revoke_all_access()
    idp.revoke_all_refresh()
    await fetch("/v1/hello")
    await wait_for(lambda: manager(client).counts["logins"] >= 2)
    assert await fetch("/v1/hello") == 200
    collect()
    for path in ("/-/status", "/-/metrics", "/-/ready", "/-/healthy"):
        assert await fetch(path) == 200
    assert await fetch("/v1/hello?token=" + "x" * 8) == 200
    await client.close()  # flush: stops the scheduler and the sessions
    flush_access_log()
    collect()

    secrets = [PASSWORD, CLIENT_SECRET, API_KEY, *issued]
    assert len(issued) >= 6  # at least three access and three refresh tokens went by
    output = stream.getvalue()
    if raw_records:
        assert EXPECTED_EVENTS <= raw.names, EXPECTED_EVENTS - raw.names
    else:
        assert " request method=GET path=/v1/hello status=200 " in output or '"path": "/v1/hello"' in output
    for secret in secrets:
        assert secret not in output
        assert not any(secret in text for text in raw.texts), "logged before redaction"
        assert not any(secret in text for text in outputs), "in a response"
    assert MASK not in output  # nothing needed the safety net: secrets were never logged
    # Tokens are named by their fingerprint.
    assert any(fingerprint(t) in output for t in issued)
    if fmt == "json":
        lines = [json.loads(line) for line in output.splitlines()]
        assert {line["event"] for line in lines} >= EXPECTED_EVENTS
    else:
        assert " warning token.unavailable " in output
        assert " error token.login_rejected " in output


async def test_provider_echoing_the_password_is_masked_everywhere(aiohttp_server, aiohttp_client):
    """A provider that echoes the password in error_description: masked in the log, /-/ready, /-/status and the 503."""
    idp = await start_idp(aiohttp_server, users={"demo": PASSWORD})
    idp.fail_next(Fault(400, body={"error": "invalid_grant", "error_description": f"wrong password {PASSWORD}"}))
    _api, api_url = await start_api(aiohttp_server, idp)
    config = keycloak_config(idp, api_url, auth={"password": PASSWORD})
    stream, _ = _capture("text", config.secrets())
    client = await start_proxy(aiohttp_client, config, rejected_backoff=lambda attempt, rand: 60.0, **QUICK_LOGINS)
    await wait_for(lambda: manager(client).last_error is not None)
    answers = {path: await client.get(path) for path in ("/-/ready", "/-/status", "/v1/hello")}
    assert [r.status for r in answers.values()] == [503, 200, 503]
    for resp in answers.values():
        text = await resp.text()
        assert PASSWORD not in text
        assert "wrong password" in text  # the provider's words are kept, the secret in them is not
    await client.close()
    output = stream.getvalue()
    assert "token.login_rejected" in output
    assert PASSWORD not in output
    assert f"wrong password {MASK}" in output


# --- the safety net ------------------------------------------------------------------------------


def test_redactor_masks_jwts_bearer_values_and_configured_secrets():
    """JWT-shaped strings, Bearer/Basic credentials and configured secrets become [REDACTED]; other text stays."""
    redact = Redactor([PASSWORD, CLIENT_SECRET, "abc"])
    text = (
        f"password={PASSWORD} secret={CLIENT_SECRET} jwt={FAKE_JWT} "
        "header='Authorization: Bearer opaque-token-1234567890' basic='Basic dXNlcjpwYXNzd29yZA==' short=abc"
    )
    out = redact(text)
    for leaked in (PASSWORD, CLIENT_SECRET, FAKE_JWT, "opaque-token-1234567890", "dXNlcjpwYXNzd29yZA=="):
        assert leaked not in out
    assert out.count(MASK) == 5
    assert "short=abc" in out  # secrets under 4 characters would mask ordinary words; they are left alone
    plain = "token.obtained token=3f2a9c1b0d expires_in_s=300"
    assert redact(plain) == plain


def test_redactor_masks_a_longer_secret_containing_a_shorter_one():
    """Overlapping secrets: the longer one is masked whole, no tail of it survives."""
    redact = Redactor(["s3cr3t", "s3cr3t-and-more"])
    assert redact("x s3cr3t-and-more y") == f"x {MASK} y"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logged_secrets_are_masked_whatever_the_path(fmt):
    """Even if code logged them (message, %-args, fields, exceptions, aiohttp's loggers), no secret reaches output."""
    stream = io.StringIO()
    setup_logging("debug", fmt, [PASSWORD, API_KEY], stream=stream)
    log.info("login with %s and key %s", PASSWORD, API_KEY)
    log.warning("token.debug", extra={"fields": {"token": FAKE_JWT, "header": f"Bearer {FAKE_JWT}", "n": 3}})
    try:
        raise RuntimeError(f"upstream said: {FAKE_JWT} / {PASSWORD}")
    except RuntimeError:
        log.exception("token.flight_crashed")
    logging.getLogger("aiohttp.server").error("Error handling request: Authorization: Bearer %s", FAKE_JWT)
    logging.getLogger(LOGGER_NAME + ".access").info("request", extra={"fields": {"path": f"/x/{API_KEY}"}})
    output = stream.getvalue()
    for leaked in (PASSWORD, API_KEY, FAKE_JWT):
        assert leaked not in output
    assert output.count(MASK) >= 7
    assert "token.flight_crashed" in output and "RuntimeError" in output  # the traceback survives, masked
    assert '"n": 3' in output if fmt == "json" else "n=3" in output  # non-string fields are untouched


def test_redacting_filter_applies_to_any_formatter():
    """The filter rewrites the record itself, so a text or JSON formatter downstream sees only masked values."""
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 1, "sent %s", (FAKE_JWT,), None)
    record.fields = {"value": PASSWORD}
    assert RedactingFilter(Redactor([PASSWORD])).filter(record)
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert FAKE_JWT not in line and PASSWORD not in line
        assert MASK in line
