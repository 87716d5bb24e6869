# syntax=docker/dockerfile:1
# The voice-mcp LiveKit agent worker, in the shape of LiveKit's Python (pip) agent starter Dockerfile.
#   docker build -t voice-mcp .
#   docker run --env-file .env voice-mcp
# No system packages are installed: every runtime dependency in requirements.txt ships a manylinux wheel
# (no compiler needed), and `start` needs no audio device (only `console` does, through libportaudio2).
FROM python:3.11-slim

# Unbuffered stdout/stderr, so a crashing worker still leaves its logs.
# PROMETHEUS_MULTIPROC_DIR: calls run in job processes, so /metrics (METRICS_PORT) needs prometheus_client's
# multiprocess mode, which it picks at import, before agent.py runs; a writable directory the worker may fill.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PROMETHEUS_MULTIPROC_DIR=/tmp/voice-mcp-prometheus

# A non-privileged user to run the worker (its home keeps the model cache that download-files fills).
ARG UID=10001
RUN adduser \
    --disabled-password \
    --gecos "" \
    --home "/home/appuser" \
    --shell "/sbin/nologin" \
    --uid "${UID}" \
    appuser

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when requirements.txt or constraints.txt changes.
# constraints.txt pins every package to the version the test suite ran with.
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt

# Then the code (see .dockerignore: no .env, .venv, .data or caches), owned by root and read-only to the worker.
COPY . .

# The only place the worker writes in /app: the embedded PostgreSQL's cluster when DATABASE_URL is unset
# (a throwaway fallback in a container; set DATABASE_URL to a real PostgreSQL in production).
RUN mkdir -p /app/.data && chown appuser:appuser /app/.data

# Numeric, so that a runtime enforcing non-root (e.g. Kubernetes' runAsNonRoot) can verify it.
USER ${UID}

# Download the plugins' model files at build time, so a new worker does not fetch them on start.
RUN python agent.py download-files

# The worker's health check HTTP server (livekit-agents serves it on 8081 in production mode).
EXPOSE 8081

CMD ["python", "agent.py", "start"]
