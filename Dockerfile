# syntax=docker/dockerfile:1
# Build: docker build -t calsync .   Run: see README "Deploy".
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: a stub workspace with the real manifests.
COPY Cargo.toml Cargo.lock ./
COPY crates/calsync/Cargo.toml crates/calsync/
COPY crates/calsync-engine/Cargo.toml crates/calsync-engine/
COPY crates/calsync-graph/Cargo.toml crates/calsync-graph/
COPY crates/calsync-store/Cargo.toml crates/calsync-store/
COPY crates/graph-sim/Cargo.toml crates/graph-sim/
RUN for c in calsync calsync-engine calsync-graph calsync-store graph-sim; do \
      mkdir -p crates/$c/src && echo 'fn main() {}' > crates/$c/src/main.rs && touch crates/$c/src/lib.rs; \
    done && cargo build --release --locked -p calsync || true
# The real sources; queries are checked at run time, so no database is needed to build.
COPY crates crates
COPY migrations migrations
RUN find crates -name '*.rs' -exec touch {} + && cargo build --release --locked -p calsync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/calsync /usr/local/bin/calsync
COPY config/calsync.example.toml /etc/calsync/calsync.toml
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/calsync"]
CMD ["run", "--config", "/etc/calsync/calsync.toml"]
