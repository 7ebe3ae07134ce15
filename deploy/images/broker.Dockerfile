# syntax=docker/dockerfile:1.7
# The broker image: `secrets-broker` (entrypoint) and `brokerctl`.
#
#   docker build -f deploy/images/broker.Dockerfile -t secrets-broker:dev .
#
# Build context: the repository root. Only the workspace sources are copied
# (see broker.Dockerfile.dockerignore beside this file).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ------------------------------------------------------------------
# glibc Debian 12 builder, matching the glibc of the distroless cc-debian12
# runtime. aws-lc-sys compiles C code with the image's gcc; no cmake needed.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# Every workspace member's manifest and sources: cargo resolves the whole
# workspace (Cargo.lock is used as is: --locked).
COPY Cargo.toml Cargo.lock ./
COPY proto ./proto
COPY broker ./broker
COPY sidecar ./sidecar
COPY tests ./tests
# include_str! of the documented example configs (config tests).
COPY examples ./examples
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p secrets-broker --bin secrets-broker --bin brokerctl \
 && install -D -m 0755 target/release/secrets-broker /out/secrets-broker \
 && install -D -m 0755 target/release/brokerctl /out/brokerctl

# --- runtime ----------------------------------------------------------------
# Distroless "cc": glibc, libgcc, CA certificates, /etc/passwd with nonroot
# (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/example-org/secrets-broker
LABEL org.opencontainers.image.title="secrets-broker" \
      org.opencontainers.image.description="Exchanges Kubernetes workload identity tokens for short-lived secrets" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/secrets-broker /out/brokerctl /usr/local/bin/
USER 65532:65532
# 8443 gRPC (TLS), 8444 admin API (HTTPS + client certificates), 9090 ops (metrics, probes)
EXPOSE 8443 8444 9090
ENTRYPOINT ["/usr/local/bin/secrets-broker"]
CMD ["serve", "--config", "/etc/secrets-broker/broker.toml"]
