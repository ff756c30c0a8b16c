# Builds the single kiln binary. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# kiln links librados and librbd (the layer-cache allocator, crates/kiln-ceph).
RUN apt-get update && apt-get install -y --no-install-recommends librados-dev librbd-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin kiln

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
        librados2 librbd1 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 kiln
COPY --from=build /src/target/release/kiln /usr/local/bin/kiln
USER kiln
EXPOSE 8080
ENTRYPOINT []
CMD ["kiln", "serve"]
