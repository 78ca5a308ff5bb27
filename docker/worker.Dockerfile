# syntax=docker/dockerfile:1
# The worker image: `ferroclip-worker` on libtorch 2.11 (CUDA 13) with NCCL, plus the pod launcher.
# libtorch, the CUDA libraries and NCCL come from the torch 2.11.0 wheel and its nvidia-* wheels,
# so build time and run time use the very same libraries.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t ferroclip-worker:0.1.0 .

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# 1. torch 2.11.0 (+cu130 on PyPI) and its CUDA, cuDNN and NCCL wheels, in one prefix.
FROM ${PYTHON_IMAGE} AS torch
RUN pip install --no-cache-dir --target /opt/torch torch==2.11.0 \
    && echo 2.11.0 > /opt/torch/torch/build-version

# 2. Build the worker against that libtorch (torch-sys reads LIBTORCH; the CUDA libtorch enables CUDA).
FROM ${RUST_IMAGE} AS build
COPY --from=torch /opt/torch /opt/torch
ENV LIBTORCH=/opt/torch/torch \
    LD_LIBRARY_PATH=/opt/torch/torch/lib
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferroclip-worker \
    && install -D -m 0755 target/release/ferroclip-worker /out/ferroclip-worker

# 3. Run time: CUDA runtime base; the driver (libcuda.so.1) is mounted by the NVIDIA container toolkit.
FROM ${CUDA_IMAGE}
COPY --from=torch /opt/torch/torch/lib /opt/torch/torch/lib
COPY --from=torch /opt/torch/nvidia /opt/torch/nvidia
# cudarc looks for libnccl.so; the NCCL wheel ships libnccl.so.2.
RUN mkdir -p /opt/ferroclip/lib \
    && ln -s /opt/torch/nvidia/nccl/lib/libnccl.so.2 /opt/ferroclip/lib/libnccl.so
ENV LD_LIBRARY_PATH=/opt/ferroclip/lib:/opt/torch/torch/lib:/opt/torch/nvidia/nccl/lib:/opt/torch/nvidia/cu13/lib
COPY --from=build /out/ferroclip-worker /usr/local/bin/ferroclip-worker
# The same launcher as the manifests mount from their ConfigMap, for `docker run` use.
COPY k8s/base/launch-workers.sh /usr/local/bin/launch-workers
# The manifests run as uid 1000 with a read-only root filesystem; HOME points at /tmp.
USER 1000:1000
ENTRYPOINT ["ferroclip-worker"]
CMD ["--help"]
