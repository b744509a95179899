# syntax=docker/dockerfile:1
# sandbox-proxy container image (docs/deployment.md):
#
#   docker build -t sandbox-proxy .
#   docker run -p 8080:8080 -p 9091:9091 sandbox-proxy
#   docker run -p 8080:8080 -p 9091:9091 -v $PWD/config:/etc/sandbox-proxy:ro sandbox-proxy
#
# Without a mount it serves with the configuration baked in from config/container/ (listeners on
# 0.0.0.0, an empty static registry), changed by SANDBOX_PROXY_* environment variables
# (`-e SANDBOX_PROXY_DOMAINS=example.app -e SANDBOX_PROXY_REGISTRY_KIND=redis ...`). A directory
# mounted at /etc/sandbox-proxy replaces it: its proxy.toml and the registry file beside it.
#
# Reproducible: the base image is pinned to a Python patch release and a Debian release, and every
# Python package (the build backend included) to the version in constraints.txt.

# -- builder: the project and every dependency as wheels ---------------------------------------
FROM python:3.11.17-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# gcc builds the proxy's one C module (proxy/_h2session.c) against libnghttp2.so.14
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libnghttp2-14 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt pyproject.toml setup.py README.md LICENSE ./
COPY proxy/ proxy/
# PIP_CONSTRAINT (unlike --constraint) also reaches pip's isolated build environment, so the
# setuptools that builds the project's wheel is pinned as well.
RUN PIP_CONSTRAINT=/src/constraints.txt pip wheel --wheel-dir /wheels .

# -- runtime: a virtual environment with those wheels, run as an unprivileged user -------------
FROM python:3.11.17-slim-bookworm
ENV VIRTUAL_ENV=/opt/sandbox-proxy \
    PATH=/opt/sandbox-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SANDBOX_PROXY_CONFIG=/etc/sandbox-proxy/proxy.toml
# libnghttp2: HTTP/2 framing and HPACK for proxy/_h2session.c
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnghttp2-14 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 sandbox-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sandbox-proxy
# The default configuration: proxy.toml and an empty sandboxes.toml (read-only for the user).
COPY config/container/ /etc/sandbox-proxy/
# The wheels are bind-mounted from the builder, so they never become a layer of this image. The
# venv has no pip of its own: the base image's pip installs into it (offline, wheels only).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/sandbox-proxy \
 && python -m pip --python /opt/sandbox-proxy/bin/python install --no-index --no-cache-dir \
        --disable-pip-version-check --find-links /wheels sandbox-proxy \
 && /opt/sandbox-proxy/bin/python -c "import uvloop, httptools, proxy._h2session" \
 && sandbox-proxy --version \
 && sandbox-proxy --check

USER 10001:10001
# 8080 edge, 9091 metrics (/metrics, /healthz, /readyz), 9092 admin API (only when [admin] listen
# or SANDBOX_PROXY_ADMIN_LISTEN is set)
EXPOSE 8080 9091 9092
# /healthz on the metrics listener (port 9091 must be enabled in the config); python's urllib,
# as the image has no curl. urlopen raises on refusal or a non-2xx answer: exit status 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=2)"]
# SIGTERM (docker stop) drains: give the container drain_delay + drain_timeout + a margin
# (`docker stop -t 45`, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# No CMD: the config file is $SANDBOX_PROXY_CONFIG; arguments after the image name are options
# (`docker run sandbox-proxy --log-level debug`).
ENTRYPOINT ["sandbox-proxy"]
