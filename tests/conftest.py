from __future__ import annotations

import logging

import pytest

from proxy.observability import LOGGER_NAME


@pytest.fixture(autouse=True)
def _reset_logging():
    """Each test starts with our loggers propagating to pytest's capture, at debug level."""
    for name in (LOGGER_NAME, "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.DEBUG)
    yield
