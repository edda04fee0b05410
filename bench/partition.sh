#!/usr/bin/env bash
# partition.sh: does splitting one merge between processes pay? (multi-node merging, measured
# on one machine: each process stands in for a node.)
#
# Generates K synthetic Llama-shaped bf16 checkpoints (examples/gen_ckpts.rs; reused when they
# exist), warms the page cache (so the CPU, not the disk, limits one process), then runs R
# interleaved repetitions of
#   (a) one process:  pmad merge --threads 1 --method sma --out OUT CKPT...
#   (b) N=2 processes: pmad merge --threads 1 --partition I/2 ... started together, then
#       pmad merge --commit (timed apart: "commit")
#   (c) N=4 processes, the same
# and prints median wall times, each split's ratio to (a) for the parts alone and with the
# commit, and the bytes each process read (each should read only its part: about 1/N).
# Every committed output is compared byte for byte with (a)'s (merge.json aside).
#
# Usage: bench/partition.sh [--dir DIR] [--count K] [--size SIZE] [--shard-size S] [--reps R]
#                           [--no-build]
#   defaults: /tmp/pmad-bench-part, 8, 250MB, 16MB (so ~16 output shards: split by shard), 5
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
DIR=/tmp/pmad-bench-part
K=8
SIZE=250MB
SHARD=16MB
REPS=5
BUILD=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --dir) DIR=$2; shift 2 ;;
    --count) K=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --shard-size) SHARD=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "partition.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
PMAD=$ROOT/target/release/pmad
GEN=$ROOT/target/release/examples/gen_ckpts
if [[ $BUILD == 1 ]]; then
  (cd "$ROOT" && cargo build --release --quiet --bin pmad --example gen_ckpts)
fi
mkdir -p "$DIR"
mapfile -t CKPTS < <("$GEN" --dir "$DIR" --count "$K" --size "$SIZE" 2>/dev/null)
for c in "${CKPTS[@]}"; do cat "$c"/*.safetensors >/dev/null; done
OUTS=$DIR/outs
rm -rf "$OUTS"
mkdir -p "$OUTS"
ARGS=(--method sma --threads 1 --shard-size "$SHARD")

same() { # A B: every file but merge.json identical
  local f
  for f in "$1"/*; do
    [[ $(basename "$f") == merge.json ]] && continue
    cmp -s "$f" "$2/$(basename "$f")" || { echo "partition.sh: $(basename "$f") differs" >&2; exit 1; }
  done
}

declare -A T
declare -A READ
single() {
  rm -rf "$OUTS/single"
  local t0; t0=$(now)
  "$PMAD" merge "${ARGS[@]}" --out "$OUTS/single" "${CKPTS[@]}" >/dev/null
  T[single]+=" $(secs "$t0" "$(now)")"
}
split() { # N
  local n=$1 out=$OUTS/split$1 i pids=() t0 t1
  rm -rf "$out" "$OUTS/.pmad-staging"
  t0=$(now)
  for ((i = 0; i < n; i++)); do
    "$PMAD" merge "${ARGS[@]}" --partition "$i/$n" --out "$out" "${CKPTS[@]}" >"$OUTS/part$i.log" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  t1=$(now)
  "$PMAD" merge "${ARGS[@]}" --commit --out "$out" "${CKPTS[@]}" >/dev/null
  T[parts$n]+=" $(secs "$t0" "$t1")"
  T[commit$n]+=" $(secs "$t1" "$(now)")"
  READ[$n]=$(for ((i = 0; i < n; i++)); do sed -n 's/.*(\(.*\) read).*/\1/p' "$OUTS/part$i.log"; done | paste -sd/)
}

echo "== $K x $SIZE bf16, warm cache, $REPS interleaved reps, 1 thread per process, $(nproc) CPUs" >&2
for ((r = 1; r <= REPS; r++)); do
  case $((r % 3)) in
    0) single; split 2; split 4 ;;
    1) split 2; split 4; single ;;
    2) split 4; single; split 2 ;;
  esac
  same "$OUTS/split2" "$OUTS/single"
  same "$OUTS/split4" "$OUTS/single"
  echo "rep $r done" >&2
done

# shellcheck disable=SC2086
S=$(median %.3f ${T[single]})
printf '\n%-28s %9s %9s %9s %s\n' "" "median s" "vs one" "+commit" "bytes read per process"
printf '%-28s %9s %9s %9s %s\n' "one process, 1 thread" "$S" "1.00x" "" "all"
for n in 2 4; do
  # shellcheck disable=SC2086
  P=$(median %.3f ${T[parts$n]})
  # shellcheck disable=SC2086
  C=$(median %.3f ${T[commit$n]})
  printf '%-28s %9s %9s %9s %s\n' "$n processes, 1 thread each" "$P" \
    "$(awk -v a="$P" -v b="$S" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(awk -v a="$P" -v c="$C" -v b="$S" 'BEGIN { printf "%.2fx", (a + c) / b }')" "${READ[$n]}"
  printf '%-28s %9s\n' "  commit" "$C"
done
echo "(every split output byte-identical to the one-process output)"
echo "CPU load average: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$OUTS"
