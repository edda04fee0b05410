# pmad container image: multi-stage build, glibc runtime without a shell (distroless).
#
#   docker build --build-arg VERSION="$(cargo pkgid | sed 's/.*[#@]//')" -t pmad:dev .
#   docker run --rm -v ckpt:/ckpt:ro -v merged:/ckpt-merged -p 9464:9464 pmad:dev
#
# Offline build (no crates.io from inside the build, e.g. an air-gapped builder): vendor the
# crates on a machine that has them and pass the directory as the `vendor` build context:
#
#   cargo vendor --locked /tmp/pmad-vendor > /dev/null
#   docker build --build-context vendor=/tmp/pmad-vendor -t pmad:dev .
#
# The image ships config/pmad.toml as /etc/pmad/pmad.toml; deployments mount their own
# config over /etc/pmad (see deploy/). The runtime user is numeric (65532 = distroless
# "nonroot") so Kubernetes can verify runAsNonRoot without resolving user names.

# ---- vendored crates (optional) ----------------------------------------------------------
# Empty unless `--build-context vendor=DIR` replaces it with the output of `cargo vendor`.
# An empty stage changes nothing: cargo then downloads from crates.io as usual.
FROM scratch AS vendor

# ---- build stage -------------------------------------------------------------------------
# Same toolchain as the development machines (rustc 1.95.0); bookworm = Debian 12, the same
# glibc (2.36) as the distroless cc-debian12 runtime below.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src

# 1) Dependencies only, against stub sources: this layer is rebuilt only when Cargo.toml or
#    Cargo.lock change. benches/kernels.rs must exist because Cargo.toml declares [[bench]].
#    With a non-empty `vendor` context, .cargo/config.toml points cargo at it, offline.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=bind,from=vendor,target=/vendor \
    if [ -n "$(ls -A /vendor 2>/dev/null)" ]; then \
        mkdir -p .cargo \
        && printf '%s\n' '[source.crates-io]' 'replace-with = "vendored-sources"' \
           '[source.vendored-sources]' 'directory = "/vendor"' '[net]' 'offline = true' \
           > .cargo/config.toml; \
    fi \
    && mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && echo 'fn main() {}' > benches/kernels.rs \
    && cargo build --release --locked \
    && rm -rf src benches

# 2) The real sources. COPY keeps the files' original mtimes, which can be older than the stub
#    build above, and cargo would then keep the stub binary: touch the crate roots so it
#    rebuilds pmad itself (dependencies stay cached). The stub prints nothing for --version.
COPY src ./src
COPY benches ./benches
RUN --mount=type=bind,from=vendor,target=/vendor \
    touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/pmad /out/pmad \
    && mkdir -p /out/ckpt-merged \
    && version="$(/out/pmad --version)" \
    && echo "built: ${version}" \
    && test -n "${version}"

# ---- runtime stage -----------------------------------------------------------------------
# glibc + libgcc_s + CA certificates, no shell, no package manager. For releases, pin by
# digest as well (gcr.io/distroless/cc-debian12:nonroot@sha256:...).
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG SOURCE_URL=https://github.com/example/pmad
LABEL org.opencontainers.image.title="pmad" \
      org.opencontainers.image.description="PMA daemon: keeps running averages (SMA/WMA/EMA) of LLM pre-training checkpoints and publishes merged safetensors checkpoints" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

COPY --from=build /out/pmad /usr/local/bin/pmad
# An empty output directory owned by the runtime user: Docker and Podman give a new, empty
# named volume mounted here the owner of the image's directory (root if the image has none),
# so `docker run -v merged:/ckpt-merged` above is writable by 65532 without a chown step.
COPY --from=build --chown=65532:65532 /out/ckpt-merged /ckpt-merged
COPY config/pmad.toml /etc/pmad/pmad.toml

USER 65532:65532
# [server] listen: /healthz /readyz /metrics /status
EXPOSE 9464
# pmad is PID 1 and handles SIGTERM itself (graceful within [daemon] shutdown_grace).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pmad"]
CMD ["run", "--config", "/etc/pmad/pmad.toml"]
