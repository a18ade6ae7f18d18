"""The wire suite: request smuggling and response desync, hunted through the whole proxy.

Real upstream servers (nginx, gunicorn sync and gthread, uvicorn with h11 and with httptools, hypercorn,
waitress) run as subprocesses on 127.0.0.1 serving the echo app in ``apps.py``; a raw recorder in the test
process plays misbehaving upstreams; the proxy runs on its real listener (``proxy.cli.serve``); clients
write raw bytes. ``python -m pytest tests/wire`` runs it (about 20 s on two cores); a server that cannot
be started makes its tests error with the reason, never skip.

Files: ``servers.py`` starts and stops the real servers, ``apps.py`` is what they serve, ``recorder.py``
is the raw upstream, ``client.py`` the raw client and its strict response parser, ``conftest.py`` the
fixtures; ``test_desync.py`` (real servers, hypothesis) and ``test_misbehaving_upstream.py`` (recorder).
"""
