# One image for every Tessera component:
#   /usr/local/bin/tessera-webhook, tessera-scheduler, tessera-node-agent, tessera
#   /opt/tessera/lib/libtessera-cuda.so   (the node agent installs it on the host)
# Build: hack/build-images.sh (or `docker build -t tessera .`).

# Builder on Debian bullseye on purpose: the interceptor is preloaded into
# every process of every GPU container, so it must load against the oldest
# glibc those images carry. Built here it needs glibc 2.31 at most (Ubuntu
# 20.04 and newer); built on bookworm it would need 2.34 and break older
# CUDA images. The binaries built here run on the bookworm runtime below.
FROM debian:bullseye-slim AS builder
ARG RUST_VERSION=1.95.0
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p tessera-webhook -p tessera-scheduler -p tessera-node-agent -p tessera-cli \
      -p tessera-interceptor \
 && mkdir -p /out/bin /out/lib \
 && cp target/release/tessera-webhook target/release/tessera-scheduler \
       target/release/tessera-node-agent target/release/tessera /out/bin/ \
 && cp target/release/libtessera_cuda.so /out/lib/libtessera-cuda.so

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/bin/ /usr/local/bin/
# The node agent's --interceptor-source default.
COPY --from=builder /out/lib/libtessera-cuda.so /opt/tessera/lib/libtessera-cuda.so
# Non-root by default; the node agent's DaemonSet runs it as root (see
# manifests/node-agent.yaml for why).
USER 65532:65532
ENTRYPOINT []
CMD ["/usr/local/bin/tessera", "--help"]
