#!/usr/bin/env bash
# Pre-release check of the container image: builds the repository's Dockerfile for real and runs
# the image the way deploy/kubernetes/job.yaml does, on one machine, with podman and no
# container registry.
#
#   sudo bash deploy/test-image.sh [--keep]
#
# Run as root on Debian bookworm (or a machine like it) with the Debian mirror and crates.io
# reachable from the host; nothing is needed from a container registry. It:
#
#  1. installs podman, runc and debootstrap if missing, and the test oracle's venv
#     (tests/py/setup_venv.sh);
#  2. builds local STAND-INS for the Dockerfile's two base images, under the names of its FROM
#     lines, labelled io.pmad.test-image.stand-in=true: the build image (debootstrap bookworm +
#     gcc + this machine's Rust toolchain laid out like the official rust image) and the runtime
#     (bookworm's libc6, libgcc-s1, libstdc++6, ... extracted into an empty tree with the
#     distroless layout: no shell, /etc/passwd with nonroot 65532, USER 65532). It refuses to
#     replace an image of that name that is not a stand-in;
#  3. vendors the crates on the host (`cargo vendor`) and builds the Dockerfile with
#     `--network none --build-context vendor=DIR`, then reports the image size;
#  4. checks the image's metadata, owners and modes, that it has no shell, `pmad --version`,
#     `pmad check-config` on the baked-in config, and that a new named volume on /ckpt-merged
#     is owned by 65532;
#  5. runs it like the Job's pmad sidecar (uid/gid 65532, read-only root with a 64 MiB /tmp,
#     all capabilities dropped, no-new-privileges, 10g memory, the checkpoint dir read-only,
#     an output dir group-writable by 65532 as fsGroup makes it, deploy/kubernetes/pmad.toml
#     over /etc/pmad, the Job's args and env) with no network, probed from the host inside the
#     container's network namespace (nsenter); deploy/compose/fake_trainer.py writes
#     checkpoints with the Job's trainer arguments as uid 65532;
#  6. checks /healthz and /readyz, a merge.emitted log line for every recipe, every output
#     against the float64 oracle (tests/py/oracle.py) over the inputs its merge.json names,
#     the outputs' owner, /metrics, and that `podman stop` (SIGTERM) ends pmad with exit 0 and
#     shutdown.completed within the grace period;
#  7. removes the container, the volume, the work dir and (unless --keep) every image it
#     created, and prints how long each phase took.
#
# Exit 0 when every check passed, 1 otherwise. Takes ~10 min on 2 cores, most of it the build.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
for arg in "$@"; do
    case $arg in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "usage: $0 [--keep]" >&2
            exit 2
            ;;
    esac
done
if [[ $(id -u) -ne 0 ]]; then
    echo "test-image: run as root (podman builds and runs as root here)" >&2
    exit 2
fi

PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
STAND_IN_LABEL=io.pmad.test-image.stand-in
IMAGE=localhost/pmad:test-image
CTR=pmad-test-image-$$
VOLUME=pmad-test-image-$$
K8S_CONFIG=deploy/kubernetes/pmad.toml
TRAINER_STEPS=7000 # with --save-steps 500: 14 checkpoints
RUNTIME_UID=65532
SYS_PY=/usr/bin/python3 # not a pyenv shim: the trainer runs as uid 65532

WORK=$(mktemp -d /var/tmp/pmad-test-image.XXXXXX)
chmod 0755 "$WORK"
IMAGES_BEFORE=$WORK/images-before
TRAINER_PID=
MOUNTED_IMAGE=
failures=()
phase_names=()
phase_secs=()
phase_start=0
current_phase=
T0=$(date +%s)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
ok() { printf '  ok    %s\n' "$*"; }
warn() { printf '  WARN  %s\n' "$*"; }
fail() {
    printf '  FAIL  %s\n' "$*"
    failures+=("$*")
}
die() {
    printf 'test-image: %s\n' "$*" >&2
    exit 1
}
# expect DESCRIPTION ACTUAL WANTED
expect() {
    if [[ $2 == "$3" ]]; then ok "$1: $2"; else fail "$1: got '$2', want '$3'"; fi
}

end_phase() {
    if [[ -n $current_phase ]]; then
        phase_names+=("$current_phase")
        phase_secs+=("$(($(date +%s) - phase_start))")
        current_phase=
    fi
}
phase() {
    end_phase
    current_phase=$1
    phase_start=$(date +%s)
    printf '\n== %s\n' "$1"
}
print_timings() {
    printf '\n%-50s %8s\n' phase seconds
    local i
    for i in "${!phase_names[@]}"; do
        printf '%-50s %8s\n' "${phase_names[$i]}" "${phase_secs[$i]}"
    done
    printf '%-50s %8s\n' total $(($(date +%s) - T0))
}

cleanup() {
    local rc=$?
    set +e
    end_phase
    phase_start=$(date +%s)
    current_phase=cleanup
    if [[ -n $TRAINER_PID ]]; then kill "$TRAINER_PID" 2> /dev/null; fi
    if [[ -n $MOUNTED_IMAGE ]]; then "${PODMAN[@]}" image unmount "$MOUNTED_IMAGE" > /dev/null 2>&1; fi
    "${PODMAN[@]}" rm -f -t 0 "$CTR" > /dev/null 2>&1
    "${PODMAN[@]}" volume rm -f "$VOLUME" > /dev/null 2>&1
    if ((KEEP)); then
        echo "--keep: images kept: $IMAGE, the stand-ins (label $STAND_IN_LABEL=true) and the build stage"
    elif [[ -f $IMAGES_BEFORE ]]; then
        # Every image that did not exist before this run: the stand-ins, the build stage, pmad.
        local id
        while read -r id; do
            grep -qx "$id" "$IMAGES_BEFORE" || "${PODMAN[@]}" rmi -f "$id" > /dev/null 2>&1
        done < <("${PODMAN[@]}" images -aq --no-trunc 2> /dev/null)
    fi
    rm -rf "$WORK"
    end_phase
    print_timings
    if ((rc == 0 && ${#failures[@]} == 0)); then
        echo "test-image: all checks passed"
    else
        ((${#failures[@]})) && printf 'FAILED: %s\n' "${failures[@]}"
        echo "test-image: FAILED"
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
phase "prerequisites"
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap curl:curl jq:jq nsenter:util-linux; do
    command -v "${tool%%:*}" > /dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi
echo "podman: $(podman --version), runc: $(runc --version | head -1)"
ORACLE_PY=$(bash tests/py/setup_venv.sh | tail -1)
echo "oracle python: $ORACLE_PY"
command -v cargo > /dev/null || die "cargo not found: the stand-in build image copies this machine's Rust toolchain"

mapfile -t FROMS < <(awk 'toupper($1) == "FROM" && $2 != "scratch" { print $2 }' Dockerfile)
((${#FROMS[@]} == 2)) || die "expected two base images in the Dockerfile's FROM lines, found: ${FROMS[*]}"
BUILD_BASE=${FROMS[0]}
RUNTIME_BASE=${FROMS[1]}
RUST_VERSION=${BUILD_BASE#*:}
RUST_VERSION=${RUST_VERSION%%-*}
SUITE=${BUILD_BASE##*-}
echo "build base: $BUILD_BASE (Rust $RUST_VERSION, Debian $SUITE); runtime base: $RUNTIME_BASE"
# `FROM rust:...` means docker.io/library/rust:... to Docker: tag the stand-in under that name.
BUILD_BASE_REF=$BUILD_BASE
[[ $BUILD_BASE_REF == */* ]] || BUILD_BASE_REF=docker.io/library/$BUILD_BASE_REF
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Never replace a real image with a stand-in.
for ref in "$BUILD_BASE_REF" "$RUNTIME_BASE"; do
    if "${PODMAN[@]}" image exists "$ref"; then
        label=$("${PODMAN[@]}" image inspect --format "{{ index .Labels \"$STAND_IN_LABEL\" }}" "$ref")
        [[ $label == true ]] || die "$ref exists and is not a stand-in: remove it or run elsewhere"
        "${PODMAN[@]}" rmi -f "$ref" > /dev/null
    fi
done
# ... and a test image left by --keep: built on stand-ins, it carries their label.
if "${PODMAN[@]}" image exists "$IMAGE"; then
    label=$("${PODMAN[@]}" image inspect --format "{{ index .Labels \"$STAND_IN_LABEL\" }}" "$IMAGE")
    [[ $label == true ]] || die "$IMAGE exists and was not built by this script: remove it first"
    "${PODMAN[@]}" rmi -f "$IMAGE" > /dev/null
fi
"${PODMAN[@]}" images -aq --no-trunc > "$IMAGES_BEFORE"

# ---------------------------------------------------------------------------------------------
phase "stand-in: $BUILD_BASE"
ROOTFS=$WORK/rootfs-build
log "debootstrap $SUITE (minbase + gcc, libc6-dev, ca-certificates) from $MIRROR"
debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || {
    tail -20 "$WORK/debootstrap.log"
    die "debootstrap failed"
}
TOOLCHAIN=$RUST_VERSION-x86_64-unknown-linux-gnu
SYSROOT=$(rustup run "$TOOLCHAIN" rustc --print sysroot 2> /dev/null || true)
if [[ -z $SYSROOT ]]; then
    SYSROOT=$(rustc --print sysroot)
    [[ $(rustc --version) == "rustc $RUST_VERSION "* ]] ||
        die "no Rust $RUST_VERSION toolchain here (rustup toolchain install $RUST_VERSION)"
fi
echo "toolchain: $SYSROOT ($("$SYSROOT/bin/rustc" --version))"
mkdir -p "$ROOTFS/usr/local/rustup/toolchains/$TOOLCHAIN" "$ROOTFS/usr/local/cargo/bin"
# Like the official image: no docs (rust-docs), rustup as the proxy for cargo, rustc, ...
tar -C "$SYSROOT" --exclude=./share/doc -cf - . | tar -C "$ROOTFS/usr/local/rustup/toolchains/$TOOLCHAIN" -xf -
install -m 0755 "$(command -v rustup)" "$ROOTFS/usr/local/cargo/bin/rustup"
for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-lldb; do
    ln -s rustup "$ROOTFS/usr/local/cargo/bin/$proxy"
done
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$TOOLCHAIN" \
    > "$ROOTFS/usr/local/rustup/settings.toml"
chmod -R a+rwX "$ROOTFS/usr/local/cargo" "$ROOTFS/usr/local/rustup" # as the official image
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb
tar --numeric-owner -C "$ROOTFS" -cf - . | "${PODMAN[@]}" import --quiet \
    --change "ENV RUSTUP_HOME=/usr/local/rustup" \
    --change "ENV CARGO_HOME=/usr/local/cargo" \
    --change "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV RUST_VERSION=$RUST_VERSION" \
    --change "LABEL $STAND_IN_LABEL=true" \
    --change "LABEL org.opencontainers.image.description=\"STAND-IN for $BUILD_BASE made by deploy/test-image.sh: Debian $SUITE minbase + gcc + this machine's Rust $RUST_VERSION; not the official image\"" \
    --change 'CMD ["bash"]' \
    - "$BUILD_BASE_REF" > /dev/null
"${PODMAN[@]}" run --rm --network none "${ULIMITS[@]}" "$BUILD_BASE_REF" \
    sh -c 'cargo --version && rustc --version && cc --version | head -1'

# ---------------------------------------------------------------------------------------------
phase "stand-in: $RUNTIME_BASE"
# distroless cc-debian12: these packages' files, no package manager, no shell.
DISTROLESS_PKGS=(base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 libstdc++6 libssl3)
DEBS=$ROOTFS/var/tmp/debs
mkdir -p "$DEBS"
chroot "$ROOTFS" sh -c "cd /var/tmp/debs && apt-get update -qq && apt-get download -qq ${DISTROLESS_PKGS[*]}" \
    > "$WORK/apt-download.log" 2>&1 || {
    cat "$WORK/apt-download.log"
    die "apt-get download in the $SUITE rootfs failed"
}
RUNTIME=$WORK/rootfs-runtime
mkdir -p "$RUNTIME"
for deb in "$DEBS"/*.deb; do
    dpkg-deb -x "$deb" "$RUNTIME"
    echo "  $(basename "$deb")"
done
rm -rf "$RUNTIME/usr/share/doc" "$RUNTIME/usr/share/man" "$RUNTIME/usr/share/info" \
    "$RUNTIME/usr/share/lintian" "$RUNTIME/usr/share/common-licenses"
# ca-certificates' postinst builds the bundle: take it from the rootfs where it ran.
install -D -m 0644 "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$RUNTIME/etc/ssl/certs/ca-certificates.crt"
# Programs the packages ship (ldconfig, update-ca-certificates, tzselect, ...): distroless has
# no shell, and nothing here may run one.
rm -rf "${RUNTIME:?}/usr/sbin" "${RUNTIME:?}/sbin" "${RUNTIME:?}/usr/bin" "${RUNTIME:?}/bin"
cat > "$RUNTIME/etc/passwd" << 'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$RUNTIME/etc/group" << 'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
printf 'hosts: files dns\nnetworks: files\npasswd: files\ngroup: files\nshadow: files\n' \
    > "$RUNTIME/etc/nsswitch.conf"
install -d -m 0700 "$RUNTIME/root"
install -d -m 0700 -o "$RUNTIME_UID" -g "$RUNTIME_UID" "$RUNTIME/home/nonroot"
install -d -m 1777 "$RUNTIME/tmp"
for sh in bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/dash; do
    [[ ! -e $RUNTIME/$sh ]] || die "stand-in runtime has a shell: /$sh"
done
tar --numeric-owner -C "$RUNTIME" -cf - . | "${PODMAN[@]}" import --quiet \
    --change "USER $RUNTIME_UID" \
    --change "WORKDIR /home/nonroot" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "LABEL $STAND_IN_LABEL=true" \
    --change "LABEL org.opencontainers.image.description=\"STAND-IN for $RUNTIME_BASE made by deploy/test-image.sh: Debian $SUITE packages ${DISTROLESS_PKGS[*]} with the distroless layout (no shell, nonroot 65532); not the official image\"" \
    - "$RUNTIME_BASE" > /dev/null
echo "runtime stand-in: $(du -sh "$RUNTIME" | cut -f1) uncompressed"

# ---------------------------------------------------------------------------------------------
phase "cargo vendor (host)"
VENDOR=$WORK/vendor
cargo vendor --locked --versioned-dirs "$VENDOR" > /dev/null 2> "$WORK/vendor.log" || {
    tail -20 "$WORK/vendor.log"
    die "cargo vendor failed"
}
echo "vendored $(find "$VENDOR" -mindepth 1 -maxdepth 1 -type d | wc -l) crates ($(du -sh "$VENDOR" | cut -f1))"

# ---------------------------------------------------------------------------------------------
phase "image build (Dockerfile, --network none)"
VERSION=$(cargo pkgid | sed 's/.*[#@]//')
"${PODMAN[@]}" build --pull=never --network none "${ULIMITS[@]}" \
    --build-context vendor="$VENDOR" \
    --build-arg VERSION="$VERSION" \
    -f Dockerfile -t "$IMAGE" . > "$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log"
    die "podman build failed"
}
grep -E 'STEP [0-9]+/[0-9]+:|^built:' "$WORK/build.log" | cut -c1-110 | sed 's/^/  /'
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
IMAGE_SIZE_MB=$(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1e6 }')
echo "image $IMAGE: $IMAGE_SIZE_MB MB ($size bytes)"

# ---------------------------------------------------------------------------------------------
phase "image checks"
cfg() { "${PODMAN[@]}" image inspect --format "$1" "$IMAGE"; }
expect "user" "$(cfg '{{.Config.User}}')" "65532:65532"
expect "entrypoint" "$(cfg '{{json .Config.Entrypoint}}')" '["/usr/local/bin/pmad"]'
expect "cmd" "$(cfg '{{json .Config.Cmd}}')" '["run","--config","/etc/pmad/pmad.toml"]'
expect "exposed ports" "$(cfg '{{json .Config.ExposedPorts}}')" '{"9464/tcp":{}}'
expect "stop signal" "$(cfg '{{.Config.StopSignal}}')" "SIGTERM"
expect "label org.opencontainers.image.version" \
    "$(cfg '{{ index .Config.Labels "org.opencontainers.image.version" }}')" "$VERSION"
# Inherited from the runtime stand-in: an image built here says so.
expect "label $STAND_IN_LABEL (inherited)" "$(cfg "{{ index .Config.Labels \"$STAND_IN_LABEL\" }}")" "true"
MNT=$("${PODMAN[@]}" image mount "$IMAGE")
MOUNTED_IMAGE=$IMAGE
expect "/usr/local/bin/pmad" "$(stat -c '%u:%g %a' "$MNT/usr/local/bin/pmad")" "0:0 755"
expect "/etc/pmad/pmad.toml" "$(stat -c '%u:%g %a' "$MNT/etc/pmad/pmad.toml")" "0:0 644"
expect "/ckpt-merged" "$(stat -c '%u:%g %a' "$MNT/ckpt-merged")" "65532:65532 755"
expect "/tmp" "$(stat -c '%a' "$MNT/tmp")" "1777"
if cmp -s "$MNT/etc/pmad/pmad.toml" config/pmad.toml; then
    ok "/etc/pmad/pmad.toml is config/pmad.toml"
else
    fail "/etc/pmad/pmad.toml differs from config/pmad.toml"
fi
shells=$(cd "$MNT" && find bin usr/bin sbin usr/sbin -maxdepth 1 \( -name sh -o -name bash -o -name dash -o -name busybox \) 2> /dev/null || true)
if [[ -z $shells ]]; then ok "no shell"; else fail "shell in the image: $shells"; fi
"${PODMAN[@]}" image unmount "$IMAGE" > /dev/null
MOUNTED_IMAGE=
if "${PODMAN[@]}" run --rm --network none "${ULIMITS[@]}" --entrypoint /bin/sh "$IMAGE" -c true > /dev/null 2>&1; then
    fail "/bin/sh runs in the image"
else
    ok "/bin/sh does not run"
fi
RUN_ONE=("${PODMAN[@]}" run --rm --network none "${ULIMITS[@]}" --read-only --cap-drop all)
expect "pmad --version" "$("${RUN_ONE[@]}" "$IMAGE" --version)" "pmad $VERSION"
if out=$("${RUN_ONE[@]}" "$IMAGE" check-config /etc/pmad/pmad.toml 2>&1); then
    ok "pmad check-config /etc/pmad/pmad.toml (baked in)"
else
    fail "pmad check-config on the baked-in config: $out"
fi
# `docker run -v merged:/ckpt-merged` (the Dockerfile's example): a new named volume takes the
# owner of the image's /ckpt-merged.
"${PODMAN[@]}" volume create "$VOLUME" > /dev/null
"${RUN_ONE[@]}" -v "$VOLUME:/ckpt-merged" "$IMAGE" --version > /dev/null
expect "new named volume on /ckpt-merged" \
    "$(stat -c '%u:%g' "$("${PODMAN[@]}" volume inspect --format '{{.Mountpoint}}' "$VOLUME")")" "65532:65532"
"${PODMAN[@]}" volume rm -f "$VOLUME" > /dev/null

# ---------------------------------------------------------------------------------------------
phase "run like job.yaml until healthy"
CKPT=$WORK/ckpt       # the trainer's volume: written by the trainer (65532), read-only in pmad
MERGED=$WORK/merged   # pmad's volume: root-owned, group 65532, setgid (what fsGroup does)
CONFIG=$WORK/etc-pmad # the ConfigMap
install -d -m 0755 -o "$RUNTIME_UID" -g "$RUNTIME_UID" "$CKPT"
install -d -m 2775 -o 0 -g "$RUNTIME_UID" "$MERGED"
install -d -m 0755 "$CONFIG"
install -m 0644 "$K8S_CONFIG" "$CONFIG/pmad.toml"
# The Job's pmad container: args, env, securityContext, resources, volumes.
"$SYS_PY" - deploy/kubernetes/job.yaml << 'EOF' || fail "job.yaml no longer matches what this script runs"
import sys
text = open(sys.argv[1]).read()
for want in ('args: ["run", "--config", "/etc/pmad/pmad.toml"]', "runAsUser: 65532",
             "runAsGroup: 65532", "fsGroup: 65532", "readOnlyRootFilesystem: true",
             'drop: ["ALL"]', "allowPrivilegeEscalation: false", "memory: 10Gi",
             "sizeLimit: 64Mi", "mountPath: /ckpt-merged", "mountPath: /etc/pmad",
             "readOnly: true  # pmad only reads", 'name: RUST_BACKTRACE\n              value: "1"',
             "--save_steps=500", "--save_total_limit=20", "--warmup_steps=2000",
             "--logging_steps=10", "--bf16=true"):
    if want not in text:
        sys.exit(f"job.yaml: {want!r} not found")
EOF
GRACE=$("$SYS_PY" -c 'import sys, tomllib; g = tomllib.load(open(sys.argv[1], "rb"))["daemon"]["shutdown_grace"]; print(int(g.rstrip("s")))' "$K8S_CONFIG")
STOP_TIMEOUT=$((GRACE + 10))
"${PODMAN[@]}" run -d --name "$CTR" --network none "${ULIMITS[@]}" \
    --user "$RUNTIME_UID:$RUNTIME_UID" \
    --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=64m,mode=1777 \
    --cap-drop all --security-opt no-new-privileges \
    --memory 10g \
    -e RUST_BACKTRACE=1 \
    -v "$CKPT:/ckpt:ro" -v "$MERGED:/ckpt-merged" -v "$CONFIG:/etc/pmad:ro" \
    --stop-timeout "$STOP_TIMEOUT" \
    "$IMAGE" run --config /etc/pmad/pmad.toml > /dev/null
PID=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$CTR")
http() { # http PATH: the body; status in $HTTP_STATUS
    local out
    out=$(nsenter -t "$PID" -n curl -sS -m 5 -w '\n%{http_code}' "http://127.0.0.1:9464$1" 2> /dev/null) || out=$'\n000'
    HTTP_STATUS=${out##*$'\n'}
    printf '%s' "${out%$'\n'*}"
}
HTTP_STATUS=000
healthy=0
for _ in $(seq 60); do
    http /healthz > /dev/null
    if [[ $HTTP_STATUS == 200 ]]; then
        healthy=1
        break
    fi
    [[ $("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CTR") == true ]] || break
    sleep 1
done
if ((healthy)); then
    ok "/healthz 200 after $(($(date +%s) - phase_start)) s (startupProbe)"
else
    "${PODMAN[@]}" logs "$CTR" | tail -20
    die "pmad did not answer /healthz (state: $("${PODMAN[@]}" inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$CTR"))"
fi

# ---------------------------------------------------------------------------------------------
phase "trainer writes checkpoints, pmad merges"
install -m 0644 deploy/compose/fake_trainer.py "$WORK/fake_trainer.py"
# The Job's trainer arguments (save_steps, save_total_limit, warmup, logging steps, bf16).
setpriv --reuid "$RUNTIME_UID" --regid "$RUNTIME_UID" --clear-groups \
    "$SYS_PY" -B "$WORK/fake_trainer.py" --out "$CKPT" --interval 1 --max-steps "$TRAINER_STEPS" \
    --save-steps 500 --save-total-limit 20 --warmup-steps 2000 --logging-steps 10 --dtype bf16 \
    > "$WORK/trainer.log" 2>&1 &
TRAINER_PID=$!
wait "$TRAINER_PID" || fail "fake_trainer.py exited non-zero: $(tail -3 "$WORK/trainer.log")"
TRAINER_PID=
NEWEST=$(find "$CKPT" -mindepth 1 -maxdepth 1 -name 'checkpoint-*' | sed 's/.*checkpoint-//' | sort -n | tail -1)
echo "trainer wrote $(find "$CKPT" -mindepth 1 -maxdepth 1 -name 'checkpoint-*' | wc -l) checkpoints, newest step $NEWEST"
mapfile -t RECIPES < <("$SYS_PY" -c 'import sys, tomllib; [print(r["name"]) for r in tomllib.load(open(sys.argv[1], "rb"))["recipe"]]' "$K8S_CONFIG")
emitted() { # emitted RECIPE: how many merge.emitted lines the log has for it
    "${PODMAN[@]}" logs "$CTR" 2>&1 | jq -R --arg r "$1" \
        'fromjson? | select(.fields.event? == "merge.emitted" or .event? == "merge.emitted")
         | select((.fields.recipe? // .recipe?) == $r)' | jq -s length
}
# Done when every recipe has emitted and the newest checkpoint is merged (sma10 emits each one).
done_waiting=0
for _ in $(seq 180); do
    all=1
    for r in "${RECIPES[@]}"; do
        [[ $(emitted "$r") -gt 0 ]] || all=0
    done
    last=$(http /metrics | awk '/^pmad_last_emitted_step\{/ { print $2 }' | sort -n | tail -1)
    if ((all)) && [[ ${last:-0} == "$NEWEST" ]]; then
        done_waiting=1
        break
    fi
    sleep 1
done
((done_waiting)) || fail "not every recipe emitted, or the newest step $NEWEST was not merged, within 180 s"
echo "merged in $(($(date +%s) - phase_start)) s since the trainer started"

# ---------------------------------------------------------------------------------------------
phase "checks: probes, log, oracle, metrics"
http /healthz > /dev/null
expect "/healthz" "$HTTP_STATUS" 200
http /readyz > /dev/null
expect "/readyz" "$HTTP_STATUS" 200
for r in "${RECIPES[@]}"; do
    n=$(emitted "$r")
    if ((n > 0)); then ok "merge.emitted for $r: $n"; else fail "no merge.emitted for $r"; fi
done
# Every output against the float64 oracle, over the inputs its merge.json names.
"$SYS_PY" - "$K8S_CONFIG" "$MERGED" "$CKPT" > "$WORK/oracle-cmds" << 'EOF'
import json, shlex, sys, tomllib
from pathlib import Path
cfg = tomllib.load(open(sys.argv[1], "rb"))
merged, ckpt = Path(sys.argv[2]), Path(sys.argv[3])
for r in cfg["recipe"]:
    out_dir = merged / Path(r["out_dir"]).relative_to("/ckpt-merged")
    for out in sorted(out_dir.glob("step-*")):
        m = json.loads((out / "merge.json").read_text())
        args = ["--method", m["method"], "--dtype", r.get("dtype", "source")]
        # An f32 running sum where inputs cancel is off by up to 4 n 2^-24 max|x_i|.
        if cfg.get("state", {}).get("accumulator", "f32") == "f32":
            args += ["--accumulator-tolerance", "f32"]
        if m.get("alpha") is not None:
            args += ["--alpha", repr(m["alpha"])]
        if m["method"] == "schedule":
            args += ["--shape", r["shape"], "--final-lr-ratio", repr(r.get("final_lr_ratio", 0.0))]
        if m["method"] == "weights":
            args += ["--weights", ",".join(map(repr, r["weights"]))]
        inputs = [str(ckpt / Path(p).relative_to("/ckpt")) for p in m["inputs"]]
        print(r["name"], out.name, len(inputs), shlex.join(args + [str(out)] + inputs))
EOF
checked=0
while read -r recipe step n cmd; do
    read -ra argv <<< "$cmd"
    if res=$("$ORACLE_PY" tests/py/oracle.py check "${argv[@]}" 2>&1); then
        ok "oracle $recipe/$step ($n inputs): ${res##*$'\n'}"
        checked=$((checked + 1))
    else
        printf '%s\n' "$res" | head -5 | sed 's/^/        /'
        fail "oracle $recipe/$step: ${res%%$'\n'*}"
    fi
done < "$WORK/oracle-cmds"
[[ -s $WORK/oracle-cmds ]] || fail "no output to check against the oracle"
echo "$checked outputs equal the oracle's"
for r in "${RECIPES[@]}"; do
    grep -q "^$r " "$WORK/oracle-cmds" || fail "no output of recipe $r on the volume"
done
not_owned=$(find "$MERGED" -mindepth 1 ! -user "$RUNTIME_UID" | head -5)
if [[ -z $not_owned ]]; then ok "every output file owned by $RUNTIME_UID"; else fail "not owned by $RUNTIME_UID: $not_owned"; fi
metrics=$(http /metrics)
expect "/metrics" "$HTTP_STATUS" 200
if grep -q "^pmad_build_info{version=\"$VERSION\"" <<< "$metrics"; then
    ok "pmad_build_info version $VERSION"
else
    fail "no pmad_build_info{version=\"$VERSION\"} in /metrics"
fi
for r in "${RECIPES[@]}"; do
    count=$(awk -v r="pmad_merges_total{recipe=\"$r\",result=\"ok\"}" '$1 == r { print $2 }' <<< "$metrics")
    expect "pmad_merges_total{recipe=\"$r\",result=\"ok\"}" "${count:-none}" "$(emitted "$r")"
done

# ---------------------------------------------------------------------------------------------
phase "podman stop (SIGTERM)"
t=$(date +%s)
"${PODMAN[@]}" stop -t "$STOP_TIMEOUT" "$CTR" > /dev/null
took=$(($(date +%s) - t))
expect "exit code" "$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$CTR")" 0
if ((took <= GRACE)); then ok "stopped in $took s (shutdown_grace ${GRACE} s)"; else fail "stop took $took s, over shutdown_grace ${GRACE} s"; fi
if "${PODMAN[@]}" logs "$CTR" 2>&1 | grep -q '"shutdown.completed"'; then
    ok "shutdown.completed in the log"
else
    fail "no shutdown.completed in the log"
fi
"${PODMAN[@]}" logs "$CTR" > "$WORK/pmad.log" 2>&1
echo "pmad log: $(wc -l < "$WORK/pmad.log") lines; image $IMAGE_SIZE_MB MB"
if ((${#failures[@]})); then
    echo "-- last pmad log lines"
    tail -20 "$WORK/pmad.log"
fi
