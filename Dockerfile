# syntax=docker/dockerfile:1
#
# One image per Lotse service, built from the workspace's single uv.lock:
#
#   docker build --build-arg SERVICE=intake -t lotse-intake .
#
# SERVICE (intake | visits | referrals | reporting) picks what is installed and becomes
# LOTSE_SERVICE, which picks the app factory `lotse_<service>.app:create_app` when the
# container starts. The image holds that one service with the contracts and the runtime, and
# nothing else of the workspace: not the other services, not the simulator (tools/), not the
# benchmarks (bench/): `uv sync --package lotse-<service>` installs exactly that package's part
# of the lock, and only the members it needs are copied. (Without --package, uv would install
# the root's dependencies, all services and tools/simulator.)
#
# The runtime stage contains the slim Python base and /app/.venv, nothing else from the build:
# the workspace packages are installed non-editable, so no source tree is copied. It runs as
# uid/gid 10001, listens on 0.0.0.0:8000 and needs no shell (the command is python itself). With a
# DATABASE_URL it writes nothing to the image's filesystem (a read-only root is fine; give it a
# writable /tmp); without one it falls back to SQLite in /app/var (owned by 10001).
#
# tests/deploy/test_image_build.py replays the COPY and `uv sync` lines below in a directory that
# holds only what they copy: a file the build needs but does not copy fails the suite.

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# --- build: resolve nothing, install exactly what uv.lock says --------------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

ARG SERVICE
RUN case "${SERVICE}" in \
        intake|visits|referrals|reporting) ;; \
        *) echo "build with --build-arg SERVICE=intake|visits|referrals|reporting (got '${SERVICE}')" >&2; exit 1 ;; \
    esac

# Third-party dependencies first: this layer is rebuilt only when the lock or a pyproject changes.
# With --package, uv reads only the members lotse-${SERVICE} needs (no other service, not
# tools/simulator) and installs only its part of the lock.
COPY pyproject.toml uv.lock ./
COPY contracts/pyproject.toml contracts/
COPY libs/runtime/pyproject.toml libs/runtime/
COPY services/${SERVICE}/pyproject.toml services/${SERVICE}/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --no-editable --package lotse-${SERVICE}

# Then the workspace members the service needs (contracts, runtime, the service) as real wheels.
COPY contracts/ contracts/
COPY libs/runtime/ libs/runtime/
COPY services/${SERVICE}/ services/${SERVICE}/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package lotse-${SERVICE}

# --- tooling (target for one-shot jobs, e.g. compose's kafka-topics) -------------------------
# The `lotse` command (ACL and topic rendering) with contracts and runtime, no service:
#   docker build --target tooling -t lotse-tooling .
FROM ${PYTHON_IMAGE} AS tooling
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY contracts/ contracts/
COPY libs/runtime/ libs/runtime/
COPY libs/tooling/ libs/tooling/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package lotse-tooling
RUN groupadd --system --gid 10001 lotse \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lotse
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001
CMD ["lotse", "--help"]

# --- runtime (the default target: one service) --------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
RUN case "${SERVICE}" in \
        intake|visits|referrals|reporting) ;; \
        *) echo "build with --build-arg SERVICE=intake|visits|referrals|reporting (got '${SERVICE}')" >&2; exit 1 ;; \
    esac \
 && groupadd --system --gid 10001 lotse \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lotse \
 && install -d -o 10001 -g 10001 -m 0750 /app/var

COPY --from=build /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOTSE_SERVICE=${SERVICE} \
    LOTSE_HTTP_HOST=0.0.0.0 \
    LOTSE_HTTP_PORT=8000 \
    LOTSE_DATA_DIR=/app/var
WORKDIR /app

# Fail the build, not the first start, if the service's factory cannot be imported.
RUN python -c "import importlib, os; importlib.import_module('lotse_' + os.environ['LOTSE_SERVICE'] + '.app').create_app"

LABEL org.opencontainers.image.title="lotse-${SERVICE}" \
      org.opencontainers.image.description="Lotse ${SERVICE} service"

USER 10001:10001
EXPOSE 8000

# Liveness only (no dependencies); docker-compose and Kubernetes probe /readyz themselves.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# The factory comes from the `lotse.services` entry points the services register, chosen by
# LOTSE_SERVICE. Access logs are off (as in `lotse up`): paths can carry case ids.
CMD ["python", "-c", "import os, sys; from importlib.metadata import entry_points; from lotse_runtime.serve import serve; name = os.environ.get('LOTSE_SERVICE', ''); apps = {ep.name: ep.value for ep in entry_points(group='lotse.services')}; name in apps or sys.exit(f'LOTSE_SERVICE={name!r} is not one of {sorted(apps)}'); serve(apps[name], host='0.0.0.0', port=8000, access_log=False)"]
