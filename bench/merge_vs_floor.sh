#!/usr/bin/env bash
# merge_vs_floor.sh: how close is `pmad merge` to the I/O floor of the machine?
#
# Generates K synthetic Llama-shaped bf16 checkpoints (examples/gen_ckpts.rs; reused when they
# already exist with the right size), builds pmad in release mode, warms the page cache, then
# runs R interleaved repetitions of
#   (a) the I/O floor: read every input byte once (`dd bs=4M of=/dev/null`, one file after the
#       other), then write as many bytes as pmad's output shards hold and fsync them
#       (`dd bs=4M conv=fsync`, copying a saved copy of pmad's output, so the data is realistic,
#       not zeros, which some virtual disks store for free; its source is in the page cache
#       and costs ~0.06 s per 500 MB of reading). Read and write are timed apart and summed.
#   (b) pmad merge --method sma --out OUT --force CKPT... (OUT removed before every run, so
#       each run writes and fsyncs a fresh output), under `/usr/bin/time` for peak RSS and
#       CPU time (user + sys).
# and prints the median wall times, pmad/floor ratio, peak RSS and throughput.
#
# Wall times are only meaningful on an otherwise idle machine: CPU idle time is sampled for a
# second before and after the timed runs, with a warning when something else was running (a
# cargo build, say); --wait-idle waits for the machine to become idle first.
#
# The floor does no computation and no publish steps (temp dir, merge.json, renames, dir
# fsyncs); pmad overlaps its reads, compute and writes, so a ratio near 1.0 is the ideal.
#
# Usage: bench/merge_vs_floor.sh [options] [-- extra pmad merge args]
#   --dir DIR          where checkpoints and outputs go   (env PMAD_BENCH_DIR,  default /tmp/pmad-bench)
#   --count K          number of checkpoints              (env PMAD_BENCH_K,    default 8)
#   --size SIZE        tensor bytes per checkpoint        (env PMAD_BENCH_SIZE, default 500MB)
#   --shape S          llama or moe: ~9.4k tensors of a few KB at 40MB (env PMAD_BENCH_SHAPE, default llama)
#   --reps R           timed repetitions                  (env PMAD_BENCH_REPS, default 5)
#   --threads N        pmad --threads (default: pmad's own default, all cores)
#   --chunk-size SIZE  pmad --chunk-size (hidden option, default 4MiB)
#   --pmad BIN         use this pmad binary instead of building one
#   --no-build         do not run cargo (binaries must already be built)
#   --wait-idle SECS   before timing, wait up to SECS for the CPUs to be >= 95% idle
#   --smoke            tiny run for CI: K=3, 2MB each, R=1, dir /tmp/pmad-bench-smoke,
#                      and checks the merged output with `pmad inspect`
#   -h, --help         this text
# Needs: cargo, GNU dd, /usr/bin/time (Debian package `time`).
# Disk space: about K x SIZE for the inputs plus 3 x SIZE for outputs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DIR=${PMAD_BENCH_DIR:-}
K=${PMAD_BENCH_K:-8}
SIZE=${PMAD_BENCH_SIZE:-500MB}
SHAPE=${PMAD_BENCH_SHAPE:-llama}
REPS=${PMAD_BENCH_REPS:-5}
THREADS=${PMAD_BENCH_THREADS:-}
CHUNK=""
PMAD=""
BUILD=1
SMOKE=0
WAIT_IDLE=0
EXTRA=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "merge_vs_floor: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --dir) DIR=$2; shift 2 ;;
    --count) K=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --shape) SHAPE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --chunk-size) CHUNK=$2; shift 2 ;;
    --pmad) PMAD=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --wait-idle) WAIT_IDLE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

if [[ $SMOKE == 1 ]]; then
  K=3 SIZE=2MB REPS=1
  DIR=${DIR:-/tmp/pmad-bench-smoke}
fi
DIR=${DIR:-/tmp/pmad-bench}
[[ $K =~ ^[0-9]+$ && $K -ge 1 ]] || die "--count must be a positive integer"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "--reps must be a positive integer"

[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (peak RSS); install it: apt-get install time"
command -v dd >/dev/null || die "dd not found"

# --- build -----------------------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GEN=$TARGET/release/examples/gen_ckpts
if [[ $BUILD == 1 ]]; then
  echo "== building (cargo build --release)" >&2
  (cd "$ROOT" && cargo build --release --quiet --bin pmad --example gen_ckpts)
fi
PMAD=${PMAD:-$TARGET/release/pmad}
[[ -x $PMAD ]] || die "$PMAD is not built (drop --no-build, or pass --pmad BIN)"
[[ -x $GEN ]] || die "$GEN is not built (drop --no-build)"

# --- inputs ----------------------------------------------------------------------------------
echo "== checkpoints: $K x $SIZE bf16 ($SHAPE) in $DIR" >&2
mapfile -t CKPTS < <("$GEN" --dir "$DIR" --count "$K" --size "$SIZE" --shape "$SHAPE")
[[ ${#CKPTS[@]} -eq $K ]] || die "generator returned ${#CKPTS[@]} checkpoints, wanted $K"

INPUT_FILES=()
for c in "${CKPTS[@]}"; do
  for f in "$c"/*.safetensors; do
    [[ -f $f ]] && INPUT_FILES+=("$f")
  done
done
IN_BYTES=0
for f in "${INPUT_FILES[@]}"; do
  IN_BYTES=$((IN_BYTES + $(stat -c %s "$f")))
done

OUT=$DIR/merged
FLOOR_OUT=$DIR/floor.out
FLOOR_SRC=$DIR/floor.src
LOG=$DIR/merge_vs_floor.log
PMAD_ARGS=(merge --method sma --out "$OUT" --force)
[[ -n $THREADS ]] && PMAD_ARGS+=(--threads "$THREADS")
[[ -n $CHUNK ]] && PMAD_ARGS+=(--chunk-size "$CHUNK")
PMAD_ARGS+=("${EXTRA[@]}")
cleanup() { rm -rf "$OUT" "$FLOOR_OUT" "$FLOOR_SRC" "$DIR/.rss"; }
trap cleanup EXIT


read_inputs() {
  local f
  for f in "${INPUT_FILES[@]}"; do
    dd if="$f" of=/dev/null bs=4M status=none
  done
}

run_pmad() { # -> sets PMAD_S, PMAD_RSS_KB, PMAD_CPU_S
  local t0 t1 rss user sys
  rm -rf "$OUT"
  sync
  t0=$(now)
  /usr/bin/time -f '%M %U %S' -o "$DIR/.rss" "$PMAD" "${PMAD_ARGS[@]}" "${CKPTS[@]}" >>"$LOG" 2>&1 \
    || die "pmad failed, see $LOG"
  t1=$(now)
  PMAD_S=$(secs "$t0" "$t1")
  read -r rss user sys < <(tail -n 1 "$DIR/.rss")
  PMAD_RSS_KB=$rss
  PMAD_CPU_S=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
}

run_floor() { # -> sets READ_S, WRITE_S, FLOOR_S
  local t0 t1 t2
  rm -f "$FLOOR_OUT"
  sync
  t0=$(now)
  read_inputs
  t1=$(now)
  dd if="$FLOOR_SRC" of="$FLOOR_OUT" bs=4M conv=fsync status=none
  t2=$(now)
  READ_S=$(secs "$t0" "$t1")
  WRITE_S=$(secs "$t1" "$t2")
  FLOOR_S=$(secs "$t0" "$t2")
}

# --- warm-up: page cache, binary, the size of pmad's output, one untimed run of each ---------
# (the first large write after the inputs were generated is often much slower on VM disks)
: >"$LOG"
echo "== warming the page cache ($(awk -v b="$IN_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }') MB of inputs), one untimed run of pmad and of the floor" >&2
read_inputs
run_pmad
cat "$OUT"/*.safetensors >"$FLOOR_SRC"
sync
OUT_BYTES=$(stat -c %s "$FLOOR_SRC")
run_floor
if [[ $SMOKE == 1 ]]; then
  "$PMAD" inspect "$OUT" >>"$LOG" 2>&1 || die "pmad inspect says the merged output is invalid, see $LOG"
fi

# --- timed, interleaved runs -----------------------------------------------------------------
desc="threads=${THREADS:-default}${CHUNK:+ chunk=$CHUNK}${EXTRA[*]:+ extra=${EXTRA[*]}}"
echo "== $REPS repetitions, $desc (log: $LOG)" >&2
if [[ $WAIT_IDLE -gt 0 ]]; then
  deadline=$((SECONDS + WAIT_IDLE))
  until [[ $(idle_pct) -ge 95 ]]; do
    [[ $SECONDS -lt $deadline ]] || { echo "warning: still busy after --wait-idle $WAIT_IDLE" >&2; break; }
  done
fi
IDLE0=$(idle_pct)
if busy "$IDLE0"; then
  echo "warning: CPUs only ${IDLE0}% idle before the timed runs: other processes compete for CPU and disk" >&2
fi
printf '%-4s %9s %9s %9s %9s %10s %10s\n' run read_s write_s floor_s pmad_s pmad_cpu_s pmad_rssMB >&2
FL=() RD=() WR=() PM=() CPU=() RSS=()
for ((r = 1; r <= REPS; r++)); do
  run_floor
  run_pmad
  FL+=("$FLOOR_S") RD+=("$READ_S") WR+=("$WRITE_S") PM+=("$PMAD_S") CPU+=("$PMAD_CPU_S")
  RSS+=("$((PMAD_RSS_KB / 1024))")
  printf '%-4s %9s %9s %9s %9s %10s %10s\n' "$r" "$READ_S" "$WRITE_S" "$FLOOR_S" "$PMAD_S" "$PMAD_CPU_S" "${RSS[-1]}" >&2
done

# --- summary ---------------------------------------------------------------------------------
mfl=$(median %.3f "${FL[@]}") mrd=$(median %.3f "${RD[@]}") mwr=$(median %.3f "${WR[@]}")
mpm=$(median %.3f "${PM[@]}") mcpu=$(median %.2f "${CPU[@]}")
mrss=$(median %.0f "${RSS[@]}") xrss=$(maxof "${RSS[@]}")
IDLE1=$(idle_pct)
gbs() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", b / s / 1e9; else print "inf" }'; }
echo
echo "pmad merge vs I/O floor: $K x $SIZE bf16 checkpoints, $REPS reps, $desc, $(nproc) CPUs"
echo "inputs $(awk -v b="$IN_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }') MB read, output $(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }') MB written + fsync"
printf '%-26s %10s %14s %15s\n' "" "median s" "input GB/s" "output GB/s"
printf '%-26s %10s %14s %15s\n' "floor: read inputs (dd)" "$mrd" "$(gbs "$IN_BYTES" "$mrd")" "-"
printf '%-26s %10s %14s %15s\n' "floor: write+fsync (dd)" "$mwr" "-" "$(gbs "$OUT_BYTES" "$mwr")"
printf '%-26s %10s %14s %15s\n' "floor: total" "$mfl" "$(gbs "$IN_BYTES" "$mfl")" "$(gbs "$OUT_BYTES" "$mfl")"
printf '%-26s %10s %14s %15s\n' "pmad merge --method sma" "$mpm" "$(gbs "$IN_BYTES" "$mpm")" "$(gbs "$OUT_BYTES" "$mpm")"
echo "ratio pmad/floor: $(awk -v a="$mpm" -v b="$mfl" 'BEGIN { printf "%.2f", a / b }')x    pmad CPU (user+sys): median ${mcpu} s    pmad peak RSS: median ${mrss} MB, max ${xrss} MB"
echo "CPU idle: ${IDLE0}% before, ${IDLE1}% after the timed runs"
if busy "$IDLE0" || busy "$IDLE1"; then
  echo "warning: the machine was not idle; wall times are inflated by other work"
fi
