# csi-interposer image: both binaries (csi-interposer, interposer-fs) and the CSI client.
# Build: docker build -t ghcr.io/csi-interposer/csi-interposer:0.1.0 .
# The builder runs the same cargo build as CI (release, locked, whole workspace).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace \
 && install -D -t /out target/release/csi-interposer target/release/interposer-fs target/release/csi-interposer-ctl

FROM debian:bookworm-slim
# fuse3 for /dev/fuse userspace bits and fusermount (not used for mounting, handy for debugging);
# ca-certificates for TLS collectors.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/csi-interposer"]
