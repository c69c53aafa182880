# Kiln CPU runtime: serves compiled bundles from /store over gRPC on port 50051. No PyTorch inside.
# Build: docker build -t kiln-runtime .    Run: docker run -p 50051:50051 -v $PWD/store:/store:ro kiln-runtime

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY compiler ./compiler
COPY quantize ./quantize
COPY model_store ./model_store
COPY runtime ./runtime
COPY proto ./proto
COPY bench ./bench
# runtime dependencies only (numpy, onnxruntime, tokenizers, grpcio, pillow): no [compiler] extra
RUN python -m venv /opt/kiln && /opt/kiln/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 kiln && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent --shell /usr/sbin/nologin kiln
COPY --from=build /opt/kiln /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/store"]
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["kiln", "wait", "--target", "127.0.0.1:50051", "--timeout", "4"]
ENTRYPOINT ["kiln"]
CMD ["serve", "--store", "/store", "--host", "0.0.0.0", "--port", "50051"]
