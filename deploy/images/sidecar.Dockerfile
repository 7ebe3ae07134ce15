# syntax=docker/dockerfile:1.7
# The per-pod sidecar image: `secrets-sidecar`.
#
#   docker build -f deploy/images/sidecar.Dockerfile -t secrets-sidecar:dev .
#
# Build context: the repository root (see sidecar.Dockerfile.dockerignore).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
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
    triple="$(uname -m)-unknown-linux-gnu" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile release-small --locked -p secrets-sidecar --bin secrets-sidecar \
      --target "$triple" \
 && install -D -m 0755 "target/$triple/release-small/secrets-sidecar" /out/secrets-sidecar

# --- runtime ----------------------------------------------------------------
# The binary is static (crt-static: glibc linked in, no loader, no shared
# library), so the injector's exec mode can copy it into any app image:
# Debian, Alpine (musl), distroless static, scratch. Nothing else is needed
# here either.
FROM gcr.io/distroless/static-debian12:nonroot AS runtime
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/example-org/secrets-broker
LABEL org.opencontainers.image.title="secrets-sidecar" \
      org.opencontainers.image.description="Per-pod sidecar: keeps short-lived secrets from secrets-broker fresh on a tmpfs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/static-debian12:nonroot"
COPY --from=build /out/secrets-sidecar /usr/local/bin/secrets-sidecar
USER 65532:65532
# 8099: /healthz, /readyz, /metrics (when health_listen binds a pod address)
EXPOSE 8099
ENTRYPOINT ["/usr/local/bin/secrets-sidecar"]
CMD ["run", "--config", "/etc/secrets-sidecar/sidecar.toml"]
