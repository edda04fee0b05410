#!/usr/bin/env bash
# End-to-end PMA check with torchtitan-style DCP checkpoints, merged live by pmad.
#
#   examples/torchtitan-dcp/run.sh        # from anywhere; paths are resolved from the repo root
#
# 1. creates examples/torchtitan-dcp/.venv (torch from PyPI, ~5.6 GB, once), unless VENV names one
# 2. builds pmad (cargo build --release) and starts `pmad run` on pmad.toml in the background
# 3. trains a ~0.9M-parameter byte-level torchtitan-style Llama on the stdlib's sources
#    (train.py): a DCP checkpoint (torch.distributed.checkpoint.save) every SAVE_EVERY steps into
#    run/output/checkpoint/step-N/, the newest KEEP_LATEST kept, while pmad merges them as they land
# 4. waits until every recipe has published the final step, stops pmad with SIGTERM
# 5. scores the newest checkpoint and each recipe's LATEST output on held-out files and
#    recomputes every merge in float64 (eval.py --verify)
# 6. restart check: resumes training for RESUME_STEPS steps from the best recipe's output
#    (train.py --resume-from, model + optimizer + scheduler + data position + step) and, as the
#    control, from the newest checkpoint (restart_check.py)
#
# Environment knobs: MAX_STEPS (1500), SAVE_EVERY (50), KEEP_LATEST (10, torchtitan's
# keep_latest_k), RESUME_STEPS (50), VENV (an existing venv with torch 2.15 to use as is instead
# of creating examples/torchtitan-dcp/.venv), PYTHON (python3, to create the venv), KEEP_RUN=1 to
# reuse an existing run/ instead of starting over, SKIP_BUILD=1 to use target/release/pmad as is.
# Everything the run writes goes to examples/torchtitan-dcp/run/ (git-ignored).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

EX=examples/torchtitan-dcp
RUN=$EX/run
MAX_STEPS=${MAX_STEPS:-1500}
SAVE_EVERY=${SAVE_EVERY:-50}
KEEP_LATEST=${KEEP_LATEST:-10}
RESUME_STEPS=${RESUME_STEPS:-50}
PYTHON=${PYTHON:-python3}
PMAD=target/release/pmad
RECIPES=(sma4 sma8 ema0.2)   # the out_dirs in pmad.toml: $RUN/merged/<name>
# Pinned: the version this example was measured with. Nothing else is needed (no torchtitan).
PIP_PKGS=(torch==2.15.0)

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Show the summary lines, every checkpoint's save time sparsely, and every 20th loss line.
progress() {
    local n=0 line
    while IFS= read -r line; do
        case $line in
            corpus:* | model:* | training:* | resumed:*) printf '%s\n' "$line" ;;
            step:*)
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
if [[ -n ${VENV:-} ]]; then
    log "using the venv $VENV as it is"
else
    VENV=$EX/.venv
    if [[ ! -f $VENV/.installed ]]; then
        log "creating $VENV (torch from PyPI; ~4 min, ~5.6 GB)"
        t=$SECONDS
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
        touch "$VENV/.installed"
        log "venv ready in $((SECONDS - t))s"
    fi
fi
PY=$VENV/bin/python
"$PY" -c 'import torch, torch.distributed.checkpoint' || {
    log "$PY cannot import torch.distributed.checkpoint"
    exit 1
}

# -- 2. pmad -------------------------------------------------------------------------------
if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release"
    cargo build --release --quiet
fi
"$PMAD" check-config $EX/pmad.toml > /dev/null

if [[ -z ${KEEP_RUN:-} ]]; then
    rm -rf "$RUN"
fi
mkdir -p "$RUN/output/checkpoint" "$RUN/merged"

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
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
log "training $MAX_STEPS steps, a checkpoint every $SAVE_EVERY, the newest $KEEP_LATEST kept (log: $RUN/train.log)"
t_train=$SECONDS
"$PY" $EX/train.py --output-dir "$RUN/output" --max-steps "$MAX_STEPS" --save-every "$SAVE_EVERY" \
    --keep "$KEEP_LATEST" 2>&1 | tee "$RUN/train.log" | progress
train_s=$((SECONDS - t_train))
log "training done in ${train_s}s"

# -- 4. wait for pmad's final outputs, then stop it ---------------------------------------
final=$MAX_STEPS   # train.py always saves the last step
[[ -f $RUN/output/checkpoint/step-$final/.metadata ]] || {
    log "no checkpoint step-$final: training failed? see $RUN/train.log"
    exit 1
}
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
grep 'checkpoint.skipped\|checkpoint.rejected\|merge.failed\| WARN \| ERROR ' "$RUN/pmad.log" | sed 's/^/    /' || true

# -- 5. evaluation ---------------------------------------------------------------------------
log "evaluating (dcp.load into a fresh model for each output) and verifying every merge"
t_eval=$SECONDS
verify_rc=0
"$PY" $EX/eval.py --output-dir "$RUN/output" --merged-dir "$RUN/merged" --verify \
    --json "$RUN/results.json" | tee "$RUN/results.md" || verify_rc=$?
log "evaluation done in $((SECONDS - t_eval))s (eval.py exit status $verify_rc)"

# -- 6. restart check: resume from the best recipe's output (PMA-init) and from the checkpoint
best=$("$PY" -c '
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["model"].startswith("pmad")]
print(min(rows, key=lambda r: r["loss"])["model"].split("`")[1] if rows else "")
' "$RUN/results.json")
if [[ -z $best ]]; then
    log "no recipe published anything: no restart check"
    exit 1
fi
log "restart check: $RESUME_STEPS more steps from $RUN/merged/$best/step-$final and from the checkpoint step-$final"
t_resume=$SECONDS
rm -rf "$RUN/resume"
mkdir -p "$RUN/resume"
for from in "merged/$best" output/checkpoint; do
    out=$RUN/resume/$([[ $from == merged/* ]] && echo "$best" || echo latest)
    "$PY" $EX/train.py --output-dir "$out" --max-steps "$((final + RESUME_STEPS))" --save-every "$RESUME_STEPS" \
        --keep 1 --resume-from "$RUN/$from/step-$final" --eval 2>&1 | tee "$out.log" | progress
done
restart_rc=0
"$PY" $EX/restart_check.py --original "$RUN/output" --merged "$RUN/resume/$best" --latest "$RUN/resume/latest" \
    --results "$RUN/results.json" --json "$RUN/restart.json" | tee "$RUN/restart.md" || restart_rc=$?
log "restart check done in $((SECONDS - t_resume))s"

log "done: training ${train_s}s, total ${SECONDS}s; tables in $RUN/results.md and $RUN/restart.md"
if ((verify_rc || restart_rc)); then
    log "FAILED: eval.py --verify exit $verify_rc, restart check exit $restart_rc"
    exit 1
fi
