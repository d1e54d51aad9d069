# syntax=docker/dockerfile:1
# calsync: a static (musl) binary on distroless/static (about 2 MB), non-root, no shell.
# Build: docker build -t calsync .      Run: see README "Deploy".
FROM rust:1.95-slim-bookworm AS build
# musl-tools: a static binary runs on an image with no libc at all. Debian's security updates
# are wanted here, so the version is not pinned.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so editing the sources does not rebuild them: the real manifests over
# stub sources. The stub build is expected to fail at our own crates once the dependencies
# are built; only its cache is kept.
COPY Cargo.toml Cargo.lock ./
COPY crates/calsync/Cargo.toml crates/calsync/
COPY crates/calsync-engine/Cargo.toml crates/calsync-engine/
COPY crates/calsync-graph/Cargo.toml crates/calsync-graph/
COPY crates/calsync-store/Cargo.toml crates/calsync-store/
COPY crates/calsync-details/Cargo.toml crates/calsync-details/
COPY crates/calsync-sinks/Cargo.toml crates/calsync-sinks/
COPY crates/graph-sim/Cargo.toml crates/graph-sim/
COPY crates/calsync-testkit/Cargo.toml crates/calsync-testkit/
COPY crates/calsync-bench/Cargo.toml crates/calsync-bench/
RUN for c in calsync calsync-engine calsync-graph calsync-store calsync-details calsync-sinks graph-sim calsync-testkit calsync-bench; do \
      mkdir -p "crates/$c/src" && echo 'fn main() {}' > "crates/$c/src/main.rs" && touch "crates/$c/src/lib.rs"; \
    done; \
    cargo build --release --locked --target x86_64-unknown-linux-musl -p calsync --no-default-features; \
    rm -rf crates/*/src
# The real sources. Queries are checked at run time, so the build needs no database. The
# daemon is built without the `demo` feature: it links neither the simulator nor the test kit.
COPY crates crates
COPY migrations migrations
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --target x86_64-unknown-linux-musl -p calsync --no-default-features \
    && cargo build --release --locked --target x86_64-unknown-linux-musl -p graph-sim \
    && cp target/x86_64-unknown-linux-musl/release/calsync /calsync \
    && cp target/x86_64-unknown-linux-musl/release/graph-sim /graph-sim

# The Graph simulator, for the compose demo and tests:  docker build --target graph-sim .
FROM gcr.io/distroless/static-debian12:nonroot AS graph-sim
COPY --from=build /graph-sim /usr/local/bin/graph-sim
COPY config/graph-sim.example.toml /etc/graph-sim/scenario.toml
ENV GRAPH_SIM_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/graph-sim"]
CMD ["--scenario", "/etc/graph-sim/scenario.toml"]

# The calsync image (the default target). distroless/static: CA certificates, /etc/passwd
# with "nonroot", tzdata; no shell, no package manager.
FROM gcr.io/distroless/static-debian12:nonroot AS calsync
COPY --from=build /calsync /usr/local/bin/calsync
COPY config/calsync.example.toml /etc/calsync/calsync.toml
# The endpoint the HEALTHCHECK uses, on loopback by default: nothing outside the container
# reaches /metrics or POST /reload unless the deployment exposes it deliberately
# (CALSYNC_HTTP__LISTEN=0.0.0.0:9187, as the compose file and the Kubernetes manifests do).
# Set it to "" to turn the endpoint off.
ENV CALSYNC_HTTP__LISTEN=127.0.0.1:9187
EXPOSE 9187
USER nonroot:nonroot
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/calsync", "healthcheck", "--config", "/etc/calsync/calsync.toml"]
ENTRYPOINT ["/usr/local/bin/calsync"]
CMD ["run", "--config", "/etc/calsync/calsync.toml"]
