# syntax=docker/dockerfile:1
#
# oauth-sidecar as a container.
#
#   docker build -t oauth-sidecar .
#   docker run --rm -p 127.0.0.1:8360:8360 \
#     -v "$PWD/config.toml:/etc/oauth-sidecar/config.toml:ro" \
#     -v "$PWD/secrets/we360_password:/run/secrets/we360_password:ro" \
#     -e OAUTH_SIDECAR_AUTH_PASSWORD_FILE=/run/secrets/we360_password \
#     oauth-sidecar
#
# Configuration: /etc/oauth-sidecar/config.toml when mounted (the working directory), or the file named
# by OAUTH_SIDECAR_CONFIG, or the environment alone (OAUTH_SIDECAR_<SECTION>_<KEY>). Secrets come from
# files: OAUTH_SIDECAR_AUTH_PASSWORD_FILE, OAUTH_SIDECAR_ACCESS_API_KEY_FILE, ... under /run/secrets.
# `docker run --rm ... oauth-sidecar --check` logs in once and exits (an init step).

# --- builder: the project's wheel and every dependency's wheel --------------------------------------
FROM python:3.12-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Every dependency (aiohttp, multidict, yarl, uvloop, ...) ships binary wheels for linux amd64 and
# arm64, so no compiler is needed even here.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

# --- runtime: the slim base, the wheels, nothing to build with --------------------------------------
FROM python:3.12-slim
LABEL org.opencontainers.image.title="oauth-sidecar" \
      org.opencontainers.image.description="Logs in to an OAuth identity provider, keeps the token fresh, injects it into every request it forwards." \
      org.opencontainers.image.licenses="MIT"

# The wheels are bind-mounted from the builder for this one step, so they never become a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels "oauth-sidecar[fast]" \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidecar

# Listen on every interface, but only inside the container's own network namespace: the program's
# default stays 127.0.0.1. This variable wins over listen.host in a mounted config file; set it to
# 127.0.0.1 in a Kubernetes pod, where the app container shares the sidecar's loopback.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OAUTH_SIDECAR_LISTEN_HOST=0.0.0.0

WORKDIR /etc/oauth-sidecar
USER 10001:10001
EXPOSE 8360
STOPSIGNAL SIGTERM

# Liveness without curl: the image's own Python. Proxy variables are ignored (the check is local).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('OAUTH_SIDECAR_LISTEN_PORT') or '8360'; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + port + '/-/healthy', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["oauth-sidecar"]
