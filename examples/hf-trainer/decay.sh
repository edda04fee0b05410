#!/usr/bin/env bash
# Opt-in: how much of a REAL learning-rate decay's gain do pmad's recipes recover?
#
#   examples/hf-trainer/decay.sh          # from anywhere; after run.sh, or on its own
#
# 1. the venv, as run.sh makes it (torch + transformers from PyPI, ~5.6 GB, once)
# 2. the constant-LR run: reuses run/output from run.sh when it has checkpoint-$MAX_STEPS,
#    otherwise trains it with train.py (no daemon needed: the merges below are one-shot)
# 3. a real decay fork per shape in $SHAPES: resume from checkpoint-$((MAX_STEPS - N*50))
#    (the checkpoint just before the window) and decay the LR to 0 over the N*50 steps to
#    $MAX_STEPS; the Trainer restores optimizer, RNG and data position, so the fork sees the
#    same batches the constant-LR run saw
# 4. `pmad merge` over the last N checkpoints of the constant-LR run: sma, wma, ema
#    (alpha 2/(N+1)), schedule linear / cosine / minus_sqrt
# 5. eval.py scores the latest checkpoint, every merge and every fork, and prints each one's
#    share of each real decay's gain
#
# Knobs: MAX_STEPS (2000), N (10 checkpoints; checkpoints are every 50 steps), SHAPES
# ("linear minus_sqrt": the real decays to run, each ~3 min), PYTHON, SKIP_BUILD=1.
# Output: examples/hf-trainer/run/decay/ (git-ignored); the table in run/decay/results.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

EX=examples/hf-trainer
RUN=$EX/run
OUT=$RUN/decay
VENV=$EX/.venv
MAX_STEPS=${MAX_STEPS:-2000}
N=${N:-10}
SAVE_STEPS=50 # train.py's default --save-steps
SHAPES=${SHAPES:-linear minus_sqrt}
PYTHON=${PYTHON:-python3}
PMAD=target/release/pmad
# Pinned as in run.sh.
PIP_PKGS=(torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 safetensors==0.8.0)

log() { printf '[decay.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

START=$((MAX_STEPS - N * SAVE_STEPS))
if ((START <= SAVE_STEPS)); then
    log "MAX_STEPS=$MAX_STEPS is too short for a window of N=$N checkpoints"
    exit 2
fi

# -- 1. Python environment (as run.sh) --------------------------------------------------------
if [[ ! -f $VENV/.installed ]]; then
    log "creating $VENV (torch + transformers from PyPI; ~4 min, ~5.6 GB)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
    touch "$VENV/.installed"
fi
PY=$VENV/bin/python
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release"
    cargo build --release --quiet
fi

# -- 2. the constant-LR run -----------------------------------------------------------------
if [[ -f $RUN/output/checkpoint-$MAX_STEPS/trainer_state.json ]]; then
    log "reusing the constant-LR run in $RUN/output"
else
    log "training the constant-LR run, $MAX_STEPS steps (log: $OUT/train.log)"
    rm -rf "$RUN/output"
    mkdir -p "$RUN/output" "$OUT"
    "$PY" $EX/train.py --output-dir "$RUN/output" --max-steps "$MAX_STEPS" > "$OUT/train.log" 2>&1
fi
mkdir -p "$OUT"

# -- 3. the real decay forks ------------------------------------------------------------------
EXTRA=()
for shape in $SHAPES; do
    fork=$OUT/fork-$shape
    if [[ ! -f $fork/checkpoint-$MAX_STEPS/trainer_state.json ]]; then
        log "real $shape decay: resume from checkpoint-$START, decay to 0 by step $MAX_STEPS (log: $fork.log)"
        rm -rf "$fork"
        t=$SECONDS
        "$PY" $EX/train.py --output-dir "$fork" --max-steps "$MAX_STEPS" \
            --resume-from "$RUN/output/checkpoint-$START" --decay-start "$START" \
            --decay-shape "$shape" > "$fork.log" 2>&1
        log "  done in $((SECONDS - t))s"
    fi
    EXTRA+=(--extra "REAL $shape decay, steps $START..$MAX_STEPS=$fork/checkpoint-$MAX_STEPS")
done

# -- 4. the recipes: one-shot merges of the last N checkpoints --------------------------------
INPUTS=()
for ((s = MAX_STEPS - (N - 1) * SAVE_STEPS; s <= MAX_STEPS; s += SAVE_STEPS)); do
    INPUTS+=("$RUN/output/checkpoint-$s")
done
ALPHA=$(awk -v n="$N" 'BEGIN { printf "%.4f", 2 / (n + 1) }')
rm -rf "$OUT/merged"
merge() { # name, pmad merge options...
    local name=$1
    shift
    mkdir -p "$OUT/merged/$name"
    "$PMAD" merge "$@" --out "$OUT/merged/$name/step-$MAX_STEPS" "${INPUTS[@]}" > /dev/null
    echo "step-$MAX_STEPS" > "$OUT/merged/$name/LATEST"
}
log "pmad merge over checkpoints $((MAX_STEPS - (N - 1) * SAVE_STEPS))..$MAX_STEPS"
merge "sma$N" --method sma
merge "wma$N" --method wma
merge "ema$ALPHA" --method ema --alpha "$ALPHA"
for shape in linear cosine minus_sqrt; do
    merge "schedule-$shape" --method schedule --shape "$shape"
done

# -- 5. evaluation ----------------------------------------------------------------------------
log "evaluating (from_pretrained on each model)"
"$PY" $EX/eval.py --output-dir "$RUN/output" --merged-dir "$OUT/merged" --step "$MAX_STEPS" \
    "${EXTRA[@]}" --json "$OUT/results.json" | tee "$OUT/results.md"
log "done; table in $OUT/results.md"
