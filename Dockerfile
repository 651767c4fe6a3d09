# syntax=docker/dockerfile:1
#
# One image for every Baton component: the `baton` binary. docker-compose.yml runs it once per
# component (`baton run records`, ... `baton run gateway`).
#
#   docker build -t baton:local .
#   docker run --rm baton:local --help

# ---- build --------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# pkg-config and libssl-dev in case a TLS backend links OpenSSL; rusqlite builds SQLite from source
# with the image's gcc.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*

COPY . .

# The caches keep crates.io downloads and compiled dependencies between builds; the binary is
# copied out of the cached target dir so that the next stage can find it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p baton-cli \
 && install -m 0755 target/release/baton /usr/local/bin/baton

# ---- runtime ------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin baton \
 && mkdir -p /data \
 && chown baton:baton /data

COPY --from=builder /usr/local/bin/baton /usr/local/bin/baton

USER baton
WORKDIR /data
VOLUME ["/data"]

ENV BATON_DATA_DIR=/data \
    RUST_LOG=info

EXPOSE 8080
ENTRYPOINT ["baton"]
CMD ["--help"]
