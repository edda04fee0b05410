#!/usr/bin/env bash
# Runs deploy/multinode/slurm/pmad-multinode.sbatch without Slurm (run by .ci/lint-deploy.sh):
# srun, scontrol, curl and torchrun are stand-ins on PATH, and pmad is a wrapper that answers
# `check-config` with the real pmad and stands in for `pmad run` (which refuses count > 1 in
# this version). What it shows:
# - the script writes one config per node, each with its own state.dir, and checks each;
# - every task of the pmad step resolves its own partition from SLURM_PROCID/SLURM_NTASKS,
#   whatever the job's environment held (PMAD_PARTITION_* and the job's SLURM_NTASKS);
# - training starts only after every node's /healthz answered, with the shared paths;
# - at the end every pmad gets SIGTERM and the script waits for it, then exits with the
#   trainer's status.
# What it cannot show: Slurm's own behaviour (--overlap, signal forwarding, placement).
#
#   bash .ci/test-sbatch.sh path/to/pmad
set -euo pipefail
cd "$(dirname "$0")/.."
REAL_PMAD=$(realpath "${1:?usage: test-sbatch.sh PMAD}")
NODES=4

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
stubs=$TMP/bin
run=$TMP/run
mkdir -p "$stubs" "$run/ckpt"
sed "s#/lustre/project/llm-train#$run#g" deploy/multinode/slurm/pmad.toml > "$run/pmad.toml"

# srun: run the command once per task with SLURM_PROCID/SLURM_NTASKS set as Slurm would,
# --output with %j and %t expanded, and forward SIGTERM to every task.
cat > "$stubs/srun" << 'EOF'
#!/usr/bin/env bash
ntasks=${SLURM_NTASKS:-1} out=
while [[ $1 == -* ]]; do
    case $1 in
        --ntasks=*) ntasks=${1#*=} ;;
        --output=*) out=${1#*=} ;;
    esac
    echo "$1" >> "$STUB_LOG/srun-options"
    shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    o=${out//%j/$SLURM_JOB_ID}
    o=${o//%t/$i}
    SLURM_PROCID=$i SLURM_NTASKS=$ntasks "$@" > "${o:-/dev/stdout}" 2>&1 &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2> /dev/null' TERM
rc=0
for p in "${pids[@]}"; do
    while true; do
        wait "$p" && break
        s=$?
        kill -0 "$p" 2> /dev/null || { rc=$s; break; }
    done
done
exit "$rc"
EOF
cat > "$stubs/scontrol" << EOF
#!/usr/bin/env bash
printf 'node%d\n' \$(seq 1 $NODES)
EOF
# curl: http://node<K>/healthz answers once task K-1 of the pmad step says it is up.
cat > "$stubs/curl" << 'EOF'
#!/usr/bin/env bash
url=${*: -1}
echo "$url" >> "$STUB_LOG/curl"
[[ $url =~ ^http://node([0-9]+): ]] && [[ -e $STUB_LOG/ready-$((BASH_REMATCH[1] - 1)) ]]
EOF
cat > "$stubs/torchrun" << 'EOF'
#!/usr/bin/env bash
echo "$SLURM_PROCID $*" >> "$STUB_LOG/torchrun"
EOF
# pmad: check-config is the real one; run resolves the config as the task sees it, says it is
# up (for the curl stand-in), then waits for SIGTERM like the daemon.
cat > "$stubs/pmad" << EOF
#!/usr/bin/env bash
if [[ \$1 == check-config ]]; then exec "$REAL_PMAD" "\$@"; fi
[[ \$1 == run && \$2 == --config ]] || exit 2
trap 'echo "stopped by SIGTERM"; exit 0' TERM
"$REAL_PMAD" check-config "\$3" | grep -E '^(index|count) |^dir ' | tr -s ' ' || exit 2
touch "\$STUB_LOG/ready-\$SLURM_PROCID"
while true; do sleep 0.1; done
EOF
chmod +x "$stubs"/*
export STUB_LOG=$TMP
mkdir -p "$STUB_LOG"

# The job's environment: what sbatch sets, plus variables that must not leak into pmad.
set +e
env PATH="$stubs:$PATH" SLURM_JOB_ID=4242 SLURM_JOB_NUM_NODES=$NODES \
    SLURM_JOB_NODELIST="node[1-$NODES]" SLURM_NTASKS=$NODES SLURM_PROCID=0 SLURM_CPUS_PER_TASK=96 \
    PMAD_PARTITION_INDEX=7 PMAD_PARTITION_COUNT=9 \
    RUN_DIR="$run" PMAD=pmad PMAD_TEMPLATE="$run/pmad.toml" PMAD_DRAIN_SECONDS=0 PMAD_GRACE=5 \
    bash deploy/multinode/slurm/pmad-multinode.sbatch > "$TMP/job.out" 2>&1
rc=$?
set -e

fail=0
expect() { # expect DESCRIPTION CMD...
    if "${@:2}"; then echo "ok:   $1"; else echo "FAIL: $1"; fail=1; fi
}
expect "the batch script exits 0 (rc=$rc)" test "$rc" -eq 0
for ((i = 0; i < NODES; i++)); do
    cfg=$run/ckpt-merged/.pmad-config/4242/pmad-$i.toml
    log=$run/logs/pmad-4242-$i.log
    expect "pmad-$i.toml has state.dir .pmad-state/$i" grep -q "^dir = \"$run/ckpt-merged/.pmad-state/$i\"" "$cfg"
    expect "task $i: index = $i (from SLURM_PROCID)" grep -qx "index = $i (from SLURM_PROCID)" "$log"
    expect "task $i: count = $NODES (from SLURM_NTASKS)" grep -qx "count = $NODES (from SLURM_NTASKS)" "$log"
    expect "task $i: stopped by SIGTERM" grep -qx "stopped by SIGTERM" "$log"
done
expect "every node's /healthz answered before training" \
    test "$(sort -u "$TMP/curl" | grep -c '/healthz')" -eq "$NODES"
expect "one torchrun per node, on the shared output_dir" \
    test "$(grep -c -- "--output_dir=$run/ckpt " "$TMP/torchrun")" -eq "$NODES"
expect "the pmad step overlaps the training step" grep -qx -- --overlap "$TMP/srun-options"
if ((fail)); then
    echo "--- batch script output"
    cat "$TMP/job.out"
    for f in "$run"/logs/*; do echo "--- $f"; cat "$f"; done
    exit 1
fi
