#!/usr/bin/env bash
# End-to-end PMA check with a real Hugging Face Trainer run, merged live by pmad.
#
#   examples/hf-trainer/run.sh            # from anywhere; paths are resolved from the repo root
#
# 1. creates examples/hf-trainer/.venv (torch CPU + transformers from PyPI, ~5.6 GB, once)
# 2. builds pmad (cargo build --release) and starts `pmad run` on pmad.toml in the background
# 3. trains a ~0.9M-parameter byte-level Llama on the stdlib's sources (train.py), one
#    checkpoint every 50 steps, while pmad merges them as they land
# 4. waits until every recipe has published the final step, stops pmad with SIGTERM
# 5. scores the latest checkpoint and each recipe's LATEST output on held-out files (eval.py)
#
# Environment knobs: MAX_STEPS (2000), PYTHON (python3, to create the venv), KEEP_RUN=1 to
# reuse an existing run/ instead of starting over, SKIP_BUILD=1 to use target/release/pmad as is.
# Everything the run writes goes to examples/hf-trainer/run/ (git-ignored).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

EX=examples/hf-trainer
RUN=$EX/run
VENV=$EX/.venv
MAX_STEPS=${MAX_STEPS:-2000}
PYTHON=${PYTHON:-python3}
PMAD=target/release/pmad
RECIPES=(sma4 sma8 wma10 ema0.2)   # the out_dirs in pmad.toml: $RUN/merged/<name>
# Pinned: the versions this example was measured with.
PIP_PKGS=(torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 safetensors==0.8.0)

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Show the Trainer's summary lines and every 20th loss line (every 200 steps), as they come.
progress() {
    local n=0 line
    while IFS= read -r line; do
        case $line in
            corpus:* | model:* | training:*) printf '%s\n' "$line" ;;
            *"'loss'"*)
                n=$((n + 1))
                if ((n % 20 == 0)); then printf '%s\n' "$line"; fi
                ;;
        esac
    done
}

# -- 1. Python environment ---------------------------------------------------------------
# PyPI's only Linux x86_64 torch wheel is the CUDA build: it pulls the NVIDIA runtime wheels
# (cuBLAS, cuDNN, NCCL, ...), about 5.6 GB installed, and `import torch` refuses to start
# without them. It runs on CPU fine. (The CPU-only wheels live on PyTorch's own index, which
# this setup does not assume is reachable.)
if [[ ! -f $VENV/.installed ]]; then
    log "creating $VENV (torch + transformers from PyPI; ~4 min, ~5.6 GB)"
    t=$SECONDS
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
    touch "$VENV/.installed"
    log "venv ready in $((SECONDS - t))s"
fi
PY=$VENV/bin/python

# -- 2. pmad -------------------------------------------------------------------------------
if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release"
    cargo build --release --quiet
fi
"$PMAD" check-config $EX/pmad.toml > /dev/null

if [[ -z ${KEEP_RUN:-} ]]; then
    rm -rf "$RUN"
fi
mkdir -p "$RUN/output" "$RUN/merged"

log "starting pmad (log: $RUN/pmad.log)"
"$PMAD" run --config $EX/pmad.toml > "$RUN/pmad.log" 2>&1 &
PMAD_PID=$!
cleanup() {
    if [[ -n ${PMAD_PID:-} ]] && kill -0 "$PMAD_PID" 2> /dev/null; then
        kill -TERM "$PMAD_PID" 2> /dev/null || true
        wait "$PMAD_PID" 2> /dev/null || true
    fi
}
trap cleanup EXIT

# -- 3. training ---------------------------------------------------------------------------
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log "training $MAX_STEPS steps (log: $RUN/train.log)"
t_train=$SECONDS
"$PY" $EX/train.py --output-dir "$RUN/output" --max-steps "$MAX_STEPS" 2>&1 | tee "$RUN/train.log" | progress
train_s=$((SECONDS - t_train))
log "training done in ${train_s}s"

# -- 4. wait for pmad's final outputs, then stop it ---------------------------------------
final=$(find "$RUN/output" -maxdepth 1 -name 'checkpoint-*' -printf '%f\n' | sed -n 's/^checkpoint-\([0-9]*\)$/\1/p' | sort -n | tail -1)
log "waiting for pmad to publish step-$final for ${RECIPES[*]}"
t_wait=$SECONDS
while true; do
    done_all=1
    for r in "${RECIPES[@]}"; do
        [[ "$(cat "$RUN/merged/$r/LATEST" 2> /dev/null || true)" == "step-$final" ]] || done_all=0
    done
    ((done_all)) && break
    if ! kill -0 "$PMAD_PID" 2> /dev/null; then
        log "pmad exited early; see $RUN/pmad.log"
        exit 1
    fi
    # pmad has decided on the final checkpoint and gone quiet: a recipe whose window is not
    # full yet (a short MAX_STEPS) publishes nothing, and a skipped step publishes nothing.
    if grep -qE "checkpoint\.(accepted|skipped|rejected) step=$final " "$RUN/pmad.log" \
        && (($(date +%s) - $(stat -c %Y "$RUN/pmad.log") > 5)); then
        log "pmad is idle, but not every recipe published step-$final:"
        for r in "${RECIPES[@]}"; do
            log "  $r: LATEST = $(cat "$RUN/merged/$r/LATEST" 2> /dev/null || echo '(none)')"
        done
        break
    fi
    if ((SECONDS - t_wait > 300)); then
        log "timeout: pmad did not finish step-$final within 300s"
        break
    fi
    sleep 1
done
log "pmad caught up $((SECONDS - t_wait))s after training ended; sending SIGTERM"
kill -TERM "$PMAD_PID"
set +e
wait "$PMAD_PID"
rc=$?
set -e
PMAD_PID=
log "pmad exited with status $rc"

accepted=$(grep -c 'checkpoint.accepted' "$RUN/pmad.log" || true)
skipped=$(grep -c 'checkpoint.skipped' "$RUN/pmad.log" || true)
rejected=$(grep -c 'checkpoint.rejected' "$RUN/pmad.log" || true)
emitted=$(grep -c 'merge.emitted' "$RUN/pmad.log" || true)
failed=$(grep -c 'merge.failed' "$RUN/pmad.log" || true)
log "pmad: $accepted checkpoints accepted, $skipped skipped, $rejected rejected; $emitted outputs published, $failed failed"
grep 'checkpoint.skipped\|checkpoint.rejected' "$RUN/pmad.log" | sed 's/^/    /' || true

# -- 5. evaluation ---------------------------------------------------------------------------
log "evaluating (from_pretrained on each output)"
"$PY" $EX/eval.py --output-dir "$RUN/output" --merged-dir "$RUN/merged" --verify \
    --json "$RUN/results.json" | tee "$RUN/results.md"
log "done: training ${train_s}s, total $((SECONDS))s; table in $RUN/results.md"
