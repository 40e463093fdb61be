# syntax=docker/dockerfile:1.7
#
# One image definition for every adserve service; pick the binary with SERVICE:
#
#   docker build --build-arg SERVICE=adserve-ranker -t adserve-ranker:0.1.0 .
#
# SERVICE is one of adserve-gateway, adserve-feature-service, adserve-ranker,
# adserve-auction, adserve-label-joiner. Requires BuildKit (cache mounts).
#
# Build args:
#   SERVICE         binary to build and run (required)
#   CARGO_FEATURES  extra cargo features (the ranker's CUDA and TensorRT
#                   providers are compiled in by default)
#   ORT_PACKAGE     PyPI package the ONNX Runtime library is taken from:
#                   "onnxruntime" (CPU, default) or "onnxruntime-gpu" (CUDA 13 /
#                   TensorRT 10 providers). onnxruntime-gpu 1.31.1 needs the
#                   CUDA 13 runtime and cuDNN 9 (TensorRT 10 for tensorrt):
#                   either GPU_LIBS=cuda13 below, or a CUDA 13 cuDNN runtime
#                   image with glibc >= 2.36 as RUNTIME_IMAGE (e.g.
#                   nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04). TensorRT
#                   is not on PyPI as wheels (its packages there are stubs
#                   that download from NVIDIA's own index at install time):
#                   for the tensorrt provider use a RUNTIME_IMAGE that has
#                   TensorRT 10 for CUDA 13 (libnvinfer.so.10), or set
#                   TENSORRT_LIBS and TENSORRT_INDEX_URL below. Without it
#                   the ranker registers CUDA instead, and says so
#                   (adserve_ranker_provider_fallbacks_total).
#   GIT_SHA         commit the image is built from, reported by /buildinfo and
#                   adserve_build_info (the build context has no .git), e.g.
#                   --build-arg GIT_SHA=$(git rev-parse --short=12 HEAD)
#   GPU_LIBS        "cuda13": also copy the CUDA 13 runtime, cuBLAS, cuFFT,
#                   cuRAND and cuDNN 9 libraries from their PyPI wheels
#                   (onnxruntime-gpu[cuda,cudnn]'s nvidia-* dependencies)
#                   next to libonnxruntime.so, so a plain debian runtime
#                   image runs the CUDA provider on a GPU node (only the
#                   driver, libcuda.so.1, comes from the host through the
#                   NVIDIA container toolkit). Several GB.
#   TENSORRT_LIBS   with GPU_LIBS=cuda13, a pip requirement for the TensorRT
#                   10 libraries (e.g. "tensorrt-cu13-libs~=10.16"), installed
#                   from TENSORRT_INDEX_URL (NVIDIA's package index, e.g.
#                   https://pypi.nvidia.com). Empty (default): no TensorRT.
#   ORT_VERSION     ONNX Runtime version; must match the ort crate's API level
#                   (api-31 => 1.31.x). Same as ADSTACK_ORT_VERSION in scripts/env.sh.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS build
ARG SERVICE
ARG CARGO_FEATURES=""
ARG GIT_SHA=""
# rdkafka-sys builds librdkafka from source with its bundled configure script
# (make, g++, perl, python3); libz-sys links zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl python3 pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The target dir is a cache mount shared by all five service builds, so the
# workspace dependencies compile once; the binary is copied out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=adserve-target,sharing=locked \
    set -eu; \
    [ -n "${SERVICE:-}" ] || { echo "build arg SERVICE is required" >&2; exit 1; }; \
    ADSTACK_GIT_SHA="$GIT_SHA" cargo build --release --locked --bin "$SERVICE" ${CARGO_FEATURES:+--features "$CARGO_FEATURES"}; \
    install -D -m 0755 "target/release/$SERVICE" "/out/usr/local/bin/$SERVICE"

# ------------------------------------------------- ONNX Runtime (ranker)
# The ranker loads libonnxruntime.so at run time (ort "load-dynamic"). The
# shared library is taken from the official Python wheel, as scripts/install.sh
# does locally. For GPU use ORT_PACKAGE=onnxruntime-gpu (ships the CUDA and
# TensorRT provider libraries next to libonnxruntime.so).
FROM python:3.12-slim-bookworm AS onnxruntime
ARG ORT_PACKAGE=onnxruntime
ARG ORT_VERSION=1.31.1
ARG GPU_LIBS=""
ARG TENSORRT_LIBS=""
ARG TENSORRT_INDEX_URL=""
RUN set -eu; \
    pip install --no-cache-dir --no-deps --only-binary=:all: --target /ort "${ORT_PACKAGE}==${ORT_VERSION}"; \
    mkdir -p /lib-out; \
    cp -a /ort/onnxruntime/capi/libonnxruntime*.so* /lib-out/; \
    test -f "/lib-out/libonnxruntime.so.${ORT_VERSION}"; \
    if [ "$GPU_LIBS" = cuda13 ]; then \
      [ "$ORT_PACKAGE" = onnxruntime-gpu ] || { echo "GPU_LIBS=cuda13 needs ORT_PACKAGE=onnxruntime-gpu" >&2; exit 1; }; \
      pip install --no-cache-dir --only-binary=:all: --target /gpu "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"; \
      find /gpu/nvidia -name 'lib*.so*' -exec cp -a {} /lib-out/ \; ; \
      for lib in libcudart.so.13 libcublas.so.13 libcudnn.so.9; do \
        test -e "/lib-out/$lib" || { echo "missing $lib from the PyPI CUDA wheels" >&2; exit 1; }; \
      done; \
      if [ -n "$TENSORRT_LIBS" ]; then \
        [ -n "$TENSORRT_INDEX_URL" ] || { echo "TENSORRT_LIBS needs TENSORRT_INDEX_URL (PyPI has no TensorRT wheels)" >&2; exit 1; }; \
        pip install --no-cache-dir --no-deps --only-binary=:all: --index-url "$TENSORRT_INDEX_URL" --target /trt "$TENSORRT_LIBS"; \
        find /trt/tensorrt_libs -name 'lib*.so*' -exec cp -a {} /lib-out/ \; ; \
        test -e /lib-out/libnvinfer.so.10 || { echo "missing libnvinfer.so.10 from $TENSORRT_LIBS" >&2; exit 1; }; \
      fi; \
    elif [ -n "$GPU_LIBS" ]; then echo "GPU_LIBS must be empty or cuda13" >&2; exit 1; fi

# --------------------------------------------- per-service extra files
# Only the ranker image gets ONNX Runtime and the model; the other images get
# an empty directory from here.
FROM debian:bookworm-slim AS extras
ARG SERVICE
COPY --from=onnxruntime /lib-out/ /staging/usr/lib/adserve/
COPY models/ctr-baseline/ /staging/opt/adserve/models/ctr-baseline/
ARG ORT_VERSION=1.31.1
# libonnxruntime.so (unversioned) on the loader path: the ranker's default
# onnxruntime_dylib ("libonnxruntime.so") then resolves without configuration.
RUN mkdir -p /extras /staging/etc/ld.so.conf.d \
 && ln -sf "libonnxruntime.so.${ORT_VERSION}" /staging/usr/lib/adserve/libonnxruntime.so \
 && echo /usr/lib/adserve >/staging/etc/ld.so.conf.d/adserve.conf \
 && if [ "$SERVICE" = adserve-ranker ]; then cp -a /staging/. /extras/; fi

# -------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
ARG SERVICE
ARG ORT_VERSION=1.31.1
# curl: for the compose healthchecks (gateway /healthz, /metrics) and debugging.
# libstdc++6: needed by libonnxruntime.so.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 adserve \
 && useradd --system --uid 10001 --gid adserve --home-dir /opt/adserve --shell /usr/sbin/nologin adserve \
 && mkdir -p /opt/adserve /var/lib/adserve/training-rows /etc/adserve \
 && chown -R adserve:adserve /opt/adserve /var/lib/adserve

COPY --from=build /out/ /
COPY --from=extras /extras/ /
RUN ldconfig

# SERVICE is kept in the environment so the entrypoint can exec the binary; it
# is not an ADSERVE_* variable, so the services do not read it as config (they
# refuse unknown ADSERVE_* keys).
ENV SERVICE=${SERVICE}

# Relative defaults (model.dir = models/ctr-baseline) resolve against this.
WORKDIR /opt/adserve
USER 10001:10001

# Ports (per service; see scripts/env.sh):
#   gateway 8080 (HTTP), 50051 (gRPC), 9101 (metrics)
#   feature-service 50052/9102, ranker 50053/9103, auction 50054/9104,
#   label-joiner 50055/9105
# The services bind 127.0.0.1 by default: set ADSERVE_SERVER__GRPC_ADDR,
# ADSERVE_SERVER__METRICS_ADDR (and ADSERVE_HTTP_ADDR for the gateway) to
# 0.0.0.0:PORT, or use a config file (ADSERVE_CONFIG).
#
# exec replaces the shell, so the service is PID 1 and receives SIGTERM itself
# (it drains in-flight requests for server.shutdown_grace).
ENTRYPOINT ["/bin/sh", "-c", "exec \"/usr/local/bin/$SERVICE\" \"$@\"", "adserve"]
