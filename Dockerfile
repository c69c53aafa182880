# Kiln CPU runtime: serves compiled bundles from /store over gRPC on port 50051. No PyTorch, no compiler inside.
# Build:  docker build -t kiln-runtime .
# Keys:   docker run --rm -v kiln-data:/data kiln-runtime keys create --auth-db sqlite:////data/auth.db --tier free
# Serve:  docker run -p 50051:50051 -v "$PWD/store:/store:ro" -v kiln-data:/data kiln-runtime
# It requires API keys by default (the auth database lives on the /data volume); serving openly is an explicit
# choice: docker run ... kiln-runtime serve --store /store --host 0.0.0.0 --port 50051 --insecure-open
# HTTP:   the gateway (AUTOMATIC1111 and OpenAI APIs, SSE, web page) beside the server: add
#         --gateway-port 7861 --gateway-host 0.0.0.0 to `serve` and -p 7861:7861; or run it apart, in front of any
#         server: docker run -p 7861:7861 kiln-runtime gateway --target HOST:50051 --host 0.0.0.0

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
# what serving needs and nothing else: the CLI, the store reader, the runtime and the contract
COPY cli ./cli
COPY model_store ./model_store
COPY runtime ./runtime
COPY proto ./proto
COPY gateway ./gateway
# runtime dependencies (numpy, onnxruntime, tokenizers, grpcio, pillow, safetensors, redis) and the gateway's
# (fastapi, uvicorn): no [compiler] extra
RUN python -m venv /opt/kiln && /opt/kiln/bin/pip install --no-cache-dir ".[gateway,otel]"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 kiln && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent --shell /usr/sbin/nologin kiln \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/kiln /opt/kiln
# KILN_CACHE_DIR: verified bundle hashes are remembered on the data volume, so restarts do not hash the store again
ENV PATH=/opt/kiln/bin:$PATH PYTHONUNBUFFERED=1 KILN_CACHE_DIR=/data/cache
USER 10001:10001
VOLUME ["/store", "/data"]
EXPOSE 50051 7861
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["kiln", "wait", "--target", "127.0.0.1:50051", "--timeout", "4"]
ENTRYPOINT ["kiln"]
CMD ["serve", "--store", "/store", "--host", "0.0.0.0", "--port", "50051", "--auth-db", "sqlite:////data/auth.db"]
