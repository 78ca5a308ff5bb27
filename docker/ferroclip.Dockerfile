# syntax=docker/dockerfile:1
# The control-plane image: `ferroclip` (coordinator, shards, k8s render). No libtorch.
# Build from the repository root:
#   docker build -f docker/ferroclip.Dockerfile -t ferroclip:0.1.0 .

ARG RUST_IMAGE=rust:1.95-bookworm
# glibc, libgcc and CA certificates (HTTPS to object stores), no shell, no package manager.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The cli crate does not link libtorch, so no LIBTORCH is needed here.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferroclip \
    && install -D -m 0755 target/release/ferroclip /out/ferroclip

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/ferroclip /usr/local/bin/ferroclip
# The manifests run as uid 1000 with a read-only root filesystem.
USER 1000:1000
ENTRYPOINT ["ferroclip"]
CMD ["--help"]
