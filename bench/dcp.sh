#!/usr/bin/env bash
# dcp.sh: pmad merge on PyTorch Distributed Checkpoint (DCP) directories, against the I/O floor
# and the obvious Python routes.
#
# Generates K torchtitan-style DCP checkpoints `step-<N>/` (bench/peers/gen_dcp.py: one rank,
# `dcp.save(no_dist=True)`, a Llama-shaped model whose averaged weights total SIZE bytes, plus
# train_state, lr_scheduler and dataloader entries that a merge copies from the newest; reused
# when they already exist with the same arguments), builds pmad and the floor in release mode,
# warms the page cache, then runs R interleaved repetitions (the order rotates every
# repetition) of
#   floor     the I/O floor (examples/io_floor.rs): read every byte of the inputs' .distcp
#             files once, all files at once, one reader thread per file; then write as many
#             bytes as pmad's output (.distcp + .metadata) holds, real checkpoint bytes, and
#             fsync them
#   pmad      pmad merge --method sma --out OUT CKPT... (a fresh OUT every run; pmad writes,
#             fsyncs and publishes it atomically)
#   dcp_load  bench/peers/dcp_torch_avg.py --route dcp_load: a state dict of empty tensors
#             from the newest's .metadata, torch.distributed.checkpoint.load of each input
#             into it, sum (f32 for 16-bit inputs, f64 for f32), divide, cast, dcp.save
#   convert   bench/peers/dcp_torch_avg.py --route convert: dcp_to_torch_save each input to
#             a .pt file, torch.load(mmap=True) each, the same sum, dcp.save
# each under /usr/bin/time (peak RSS, CPU); before every run the inputs are read once, untimed.
# The Python routes' times include the interpreter's start-up and `import torch`, dcp.save's
# own fsync of the data files and an fsync of every output file (their in-script breakdown is
# in the log). Prints the median wall time, ratio to the floor, peak RSS and CPU time of each,
# the lines `ratio <tool>/floor: X.XXx`, then checks the last outputs (bench/peers/dcp_check.py,
# in the venv): the same keys, dtypes and shapes as the newest input; averaged tensors within
# 1 ulp of their dtype of a float64 recomputation; every other key equal to the newest input;
# and `pmad inspect` on pmad's output. Exits 1 if a check fails.
#
# Wall times are only meaningful on an otherwise idle machine: CPU idle time is sampled for a
# second before and after the timed runs, with a warning when something else was running.
#
# Usage: bench/dcp.sh [options]
#   --dir DIR          checkpoints and outputs           (default /tmp/pmad-bench-dcp)
#   --count K          number of checkpoints             (default 8)
#   --size SIZE        bytes of averaged weights per checkpoint (default 500MB)
#   --dtype D          f32 (torchtitan's default) or bf16  (default f32)
#   --optimizer        also save AdamW exp_avg/exp_avg_sq (copied, not averaged): 3 x SIZE
#   --reps R           timed repetitions                 (default 3)
#   --tools LIST       subset of floor,pmad,dcp_load,convert (default all four)
#   --threads N        pmad --threads (default: pmad's own default, all cores)
#   --python PY        Python with torch (default $PMAD_BENCH_VENV/bin/python, bench/.venv)
#   --pmad BIN         use this pmad binary
#   --floor BIN        use this io_floor binary
#   --no-build         do not run cargo (binaries must already be built)
#   --no-check         skip the output checks
#   --wait-idle SECS   before timing, wait up to SECS for the CPUs to be >= 95% idle
#   --clean            remove the checkpoints at the end (default: keep them for the next run)
#   --smoke            a quick run: K=3, 4MB, R=1, dir /tmp/pmad-bench-dcp-smoke; the numbers
#                      mean nothing (Python start-up dominates)
#   -h, --help         this text
# Needs: cargo, a Python with torch (tested with 2.15; bench/run.sh --setup makes bench/.venv),
# /usr/bin/time (Debian package `time`).
# Disk: K x SIZE of inputs, 3 x SIZE of outputs, and K x SIZE more while `convert` runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
DIR=""
K=8
SIZE=500MB
DTYPE=f32
OPTIM=0
REPS=3
TOOLS=floor,pmad,dcp_load,convert
THREADS=""
VENV=${PMAD_BENCH_VENV:-$ROOT/bench/.venv}
PY=""
PMAD=""
FLOOR=""
BUILD=1
CHECK=1
WAIT_IDLE=0
CLEAN=0
SMOKE=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "dcp.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --dir) DIR=$2; shift 2 ;;
    --count) K=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --optimizer) OPTIM=1; shift ;;
    --reps) REPS=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --pmad) PMAD=$2; shift 2 ;;
    --floor) FLOOR=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-check) CHECK=0; shift ;;
    --wait-idle) WAIT_IDLE=$2; shift 2 ;;
    --clean) CLEAN=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [[ $SMOKE == 1 ]]; then
  K=3 SIZE=4MB REPS=1
  DIR=${DIR:-/tmp/pmad-bench-dcp-smoke}
fi
DIR=${DIR:-/tmp/pmad-bench-dcp}
PY=${PY:-$VENV/bin/python}
[[ $K =~ ^[0-9]+$ && $K -ge 2 ]] || die "--count must be an integer >= 2"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "--reps must be a positive integer"
[[ $DTYPE == f32 || $DTYPE == bf16 ]] || die "--dtype must be f32 or bf16"
IFS=, read -r -a TOOL_LIST <<<"$TOOLS"
for t in "${TOOL_LIST[@]}"; do
  [[ $t =~ ^(floor|pmad|dcp_load|convert)$ ]] || die "unknown tool in --tools: $t"
done
want() { [[ ",$TOOLS," == *",$1,"* ]]; }
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (peak RSS): apt-get install time"
[[ -x $PY ]] || command -v "$PY" >/dev/null || die "$PY not found: pass --python, or create bench/.venv (bench/run.sh --setup)"
# (find_spec, not an import: importing torch takes seconds)
TORCH=$("$PY" -c 'import importlib.metadata as m, importlib.util as u; print(m.version("torch") if u.find_spec("torch") else "")' 2>/dev/null || true)
[[ -n $TORCH ]] || die "$PY has no torch (bench/run.sh --setup makes bench/.venv with it)"

# --- build -------------------------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $BUILD == 1 ]]; then
  echo "== building (cargo build --release: pmad, io_floor)" >&2
  (cd "$ROOT" && cargo build --release --quiet --bin pmad --example io_floor)
fi
PMAD=${PMAD:-$TARGET/release/pmad}
FLOOR=${FLOOR:-$TARGET/release/examples/io_floor}
[[ -x $PMAD ]] || die "$PMAD is not built (drop --no-build, or pass --pmad BIN)"
[[ -x $FLOOR ]] || die "$FLOOR is not built (drop --no-build, or pass --floor BIN)"

# --- inputs ------------------------------------------------------------------------------------
mkdir -p "$DIR"
LOG=$DIR/dcp.log
: >"$LOG"
GEN_ARGS=(--dir "$DIR" --count "$K" --size "$SIZE" --dtype "$DTYPE")
[[ $OPTIM == 1 ]] && GEN_ARGS+=(--optimizer)
echo "== checkpoints: $K x $SIZE $DTYPE DCP$([[ $OPTIM == 1 ]] && echo ' + AdamW moments') in $DIR (bench/peers/gen_dcp.py)" >&2
mapfile -t CKPTS < <("$PY" "$ROOT/bench/peers/gen_dcp.py" "${GEN_ARGS[@]}" 2> >(tee -a "$LOG" >&2))
[[ ${#CKPTS[@]} -eq $K ]] || die "gen_dcp.py returned ${#CKPTS[@]} checkpoints, wanted $K (see $LOG)"
INPUT_FILES=()
for c in "${CKPTS[@]}"; do
  for f in "$c"/*.distcp; do
    [[ -f $f ]] && INPUT_FILES+=("$f")
  done
done
[[ ${#INPUT_FILES[@]} -gt 0 ]] || die "no .distcp files in ${CKPTS[*]}"
IN_BYTES=0
for f in "${INPUT_FILES[@]}"; do IN_BYTES=$((IN_BYTES + $(stat -c %s "$f"))); done

cleanup() {
  rm -rf "$DIR"/out-* "$DIR/floor.bin" "$DIR/.time" "$DIR/.stdout"
  if [[ $CLEAN == 1 ]]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
warm() { cat "${INPUT_FILES[@]}" >/dev/null; }

PMAD_ARGS=(merge --method sma --force)
[[ -n $THREADS ]] && PMAD_ARGS+=(--threads "$THREADS")
declare -A WALL CPU RSS INNER
run_tool() { # TOOL REP: one timed run, appended to WALL/CPU/RSS[TOOL]
  local tool=$1 rep=$2 out=$DIR/out-$1 t0 t1 rss user sys wall cmd=() inner=""
  rm -rf "$out" "$out.convert-tmp"
  case $tool in
    floor) cmd=("$FLOOR" --jobs "${#INPUT_FILES[@]}" --out "$DIR/floor.bin" --out-bytes "$OUT_BYTES" "${INPUT_FILES[@]}") ;;
    pmad) cmd=("$PMAD" "${PMAD_ARGS[@]}" --out "$out" "${CKPTS[@]}") ;;
    dcp_load|convert) cmd=("$PY" "$ROOT/bench/peers/dcp_torch_avg.py" --route "$tool" "$out" "${CKPTS[@]}") ;;
  esac
  warm
  sync
  echo "--- $tool rep $rep: ${cmd[*]}" >>"$LOG"
  t0=$(now)
  /usr/bin/time -f '%M %e %U %S' -o "$DIR/.time" "${cmd[@]}" >"$DIR/.stdout" 2>>"$LOG" \
    || { cat "$DIR/.stdout" >>"$LOG"; die "$tool failed, see $LOG"; }
  t1=$(now)
  cat "$DIR/.stdout" >>"$LOG"
  read -r rss _ user sys < <(tail -n 1 "$DIR/.time")
  wall=$(secs "$t0" "$t1")
  if [[ $tool == dcp_load || $tool == convert ]]; then
    inner=$(sed -n 's/.*total_s=\([0-9.]*\).*/\1/p' "$DIR/.stdout")
    INNER[$tool]+="$(sed -n 's/.*import_s=\([0-9.]*\).*/\1/p' "$DIR/.stdout") "
  fi
  WALL[$tool]+="$wall "
  CPU[$tool]+="$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }') "
  RSS[$tool]+="$((rss / 1024)) "
  printf '%-4s %-9s %9s s %8s MB RSS %8s s CPU%s\n' "$rep" "$tool" "$wall" "$((rss / 1024))" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')" "${inner:+  (in-script $inner s)}" >&2
}

# --- warm-up: page cache, binaries, the output's size; one untimed run of pmad and the floor ---
echo "== warming the page cache ($(mb "$IN_BYTES") MB of .distcp inputs), one untimed run of pmad and of the floor (log: $LOG)" >&2
warm
rm -rf "$DIR/out-pmad"
"$PMAD" "${PMAD_ARGS[@]}" --out "$DIR/out-pmad" "${CKPTS[@]}" >>"$LOG" 2>&1 || die "pmad merge failed, see $LOG"
OUT_BYTES=0
for f in "$DIR/out-pmad"/*.distcp "$DIR/out-pmad/.metadata"; do OUT_BYTES=$((OUT_BYTES + $(stat -c %s "$f"))); done
"$FLOOR" --jobs "${#INPUT_FILES[@]}" --out "$DIR/floor.bin" --out-bytes "$OUT_BYTES" "${INPUT_FILES[@]}" >>"$LOG" 2>&1 \
  || die "io_floor failed, see $LOG"

# --- timed, interleaved runs ---------------------------------------------------------------------
if [[ $WAIT_IDLE -gt 0 ]]; then
  deadline=$((SECONDS + WAIT_IDLE))
  until [[ $(idle_pct) -ge 95 ]]; do
    [[ $SECONDS -lt $deadline ]] || { echo "warning: still busy after --wait-idle $WAIT_IDLE" >&2; break; }
  done
fi
IDLE0=$(idle_pct)
busy "$IDLE0" && echo "warning: CPUs only ${IDLE0}% idle before the timed runs: other processes compete for CPU and disk" >&2
desc="threads=${THREADS:-default}"
echo "== $REPS repetitions of ${TOOL_LIST[*]}, $desc" >&2
n=${#TOOL_LIST[@]}
for ((r = 1; r <= REPS; r++)); do
  for ((i = 0; i < n; i++)); do
    run_tool "${TOOL_LIST[$(((i + r - 1) % n))]}" "$r"
  done
done
IDLE1=$(idle_pct)

# --- summary -------------------------------------------------------------------------------------
label() {
  case $1 in
    floor) echo "I/O floor (io_floor, ${#INPUT_FILES[@]} readers)" ;;
    pmad) echo "pmad merge --method sma" ;;
    dcp_load) echo "torch: dcp.load each, sum, dcp.save" ;;
    convert) echo "torch: dcp_to_torch_save, torch.load" ;;
  esac
}
declare -A MED
for t in "${TOOL_LIST[@]}"; do
  read -r -a w <<<"${WALL[$t]}"
  MED[$t]=$(median %.3f "${w[@]}")
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
echo
echo "DCP merge vs the I/O floor and torch: $K x $SIZE $DTYPE DCP checkpoints (torchtitan layout, 1 rank$([[ $OPTIM == 1 ]] && echo ', AdamW moments')), $REPS reps, $desc, $(nproc) CPUs"
echo "inputs $(mb "$IN_BYTES") MB read (.distcp), output $(mb "$OUT_BYTES") MB written + fsync; torch $TORCH"
printf '%-40s %9s %10s %12s %10s  %s\n' tool "median s" "vs floor" "peak RSS MB" "CPU s" "all walls (s)"
for t in "${TOOL_LIST[@]}"; do
  read -r -a c <<<"${CPU[$t]}"
  read -r -a m <<<"${RSS[$t]}"
  rf=-
  want floor && rf="$(ratio "${MED[$t]}" "${MED[floor]}")x"
  printf '%-40s %9s %10s %12s %10s  %s\n' "$(label "$t")" "${MED[$t]}" "$rf" "$(maxof "${m[@]}")" \
    "$(median %.2f "${c[@]}")" "${WALL[$t]% }"
done
if want floor; then
  for t in "${TOOL_LIST[@]}"; do
    [[ $t == floor ]] && continue
    read -r -a c <<<"${CPU[$t]}"
    read -r -a m <<<"${RSS[$t]}"
    line="ratio $t/floor: $(ratio "${MED[$t]}" "${MED[floor]}")x    $t CPU (user+sys): median $(median %.2f "${c[@]}") s    $t peak RSS: median $(median %.0f "${m[@]}") MB, max $(maxof "${m[@]}") MB"
    if [[ -n ${INNER[$t]:-} ]]; then
      read -r -a im <<<"${INNER[$t]}"
      line+="    (Python start-up + import torch: median $(median %.2f "${im[@]}") s)"
    fi
    echo "$line"
  done
fi
if want pmad; then
  for t in dcp_load convert; do
    want "$t" && echo "ratio $t/pmad: $(ratio "${MED[$t]}" "${MED[pmad]}")x"
  done
fi
echo "CPU idle: ${IDLE0}% before, ${IDLE1}% after the timed runs"
if busy "$IDLE0" || busy "$IDLE1"; then
  echo "warning: the machine was not idle; wall times are inflated by other work"
fi

# --- checks on the last outputs -------------------------------------------------------------------
if [[ $CHECK == 1 ]]; then
  outs=()
  for t in pmad dcp_load convert; do
    [[ -d $DIR/out-$t ]] && outs+=(--out "$t=$DIR/out-$t")
  done
  if [[ -d $DIR/out-pmad ]]; then
    if "$PMAD" inspect "$DIR/out-pmad" >>"$LOG" 2>&1; then
      echo "check pmad inspect: ok"
    else
      echo "check pmad inspect: FAILED (see $LOG)"
      CHECK_FAILED=1
    fi
  fi
  if [[ ${#outs[@]} -gt 0 ]]; then
    echo "== checking $((${#outs[@]} / 2)) outputs against a float64 recomputation (bench/peers/dcp_check.py)" >&2
    "$PY" "$ROOT/bench/peers/dcp_check.py" "${outs[@]}" "${CKPTS[@]}" 2>>"$LOG" || CHECK_FAILED=1
  fi
  [[ ${CHECK_FAILED:-0} == 0 ]] || die "an output check failed, see above and $LOG"
fi
