"""Fake identity providers and upstreams: real aiohttp apps on 127.0.0.1, with hit counters."""
