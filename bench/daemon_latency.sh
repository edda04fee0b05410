#!/usr/bin/env bash
# Daemon latency and idle cost (issue "The daemon", item 12), measured on the release binary.
#
#   bash bench/daemon_latency.sh [--size 100MB] [--count 6] [--settle 1s] [--idle-seconds 60]
#
# 1. Latency from a checkpoint's marker to LATEST: checkpoints (from examples/gen_ckpts) are
#    copied into the watched dir under a temp name and renamed into place with
#    trainer_state.json already inside (t0 = the rename); the script polls <out>/LATEST every
#    10 ms until it names the new step (t1). Printed per checkpoint, with `settle` (the
#    deliberate quiet period) shown separately: latency - settle is pmad's own work.
# 2. CPU between scans: a watched tree with 1,000 files (100 checkpoint-like dirs of 10 files,
#    without markers, so every scan stats them all), pmad idle for --idle-seconds with the
#    default poll_interval (10s); CPU = utime + stime from /proc/<pid>/stat.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=100MB COUNT=6 SETTLE=1s IDLE=60 SKIP_LATENCY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --idle-seconds) IDLE=$2; shift 2 ;;
    --idle-only) SKIP_LATENCY=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bin pmad --example gen_ckpts
PMAD=target/release/pmad
WORK=$(mktemp -d /tmp/pmad-latency-XXXX)
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
SRC=/tmp/pmad-latency-ckpts-$SIZE
target/release/examples/gen_ckpts --dir "$SRC" --count "$COUNT" --size "$SIZE" >/dev/null

now() { date +%s.%N; }
mkdir -p "$WORK/watch" "$WORK/out"
cat > "$WORK/pmad.toml" <<TOML
[watch]
dir = "$WORK/watch"
settle = "$SETTLE"
[[recipe]]
name = "sma2"
method = "sma"
window = 2
out_dir = "$WORK/out/sma2"
keep = 2
[server]
listen = ""
TOML
if [ "$SKIP_LATENCY" = 0 ]; then
"$PMAD" run --config "$WORK/pmad.toml" > "$WORK/pmad.log" 2>&1 &
PID=$!
sleep 1
echo "latency from marker to LATEST (settle $SETTLE, poll_interval 10s: inotify wakes the scan)"
printf '%8s %10s\n' step latency
i=0
for src in "$SRC"/checkpoint-*; do
  i=$((i + 1))
  step=$((i * 1000))
  cp -r "$src" "$WORK/watch/tmp-checkpoint-$step"
  echo "{\"global_step\": $step, \"log_history\": []}" > "$WORK/watch/tmp-checkpoint-$step/trainer_state.json"
  sync
  t0=$(now)
  mv "$WORK/watch/tmp-checkpoint-$step" "$WORK/watch/checkpoint-$step"
  if [ "$i" -ge 2 ]; then
    until [ "$(cat "$WORK/out/sma2/LATEST" 2>/dev/null)" = "step-$step" ]; do sleep 0.01; done
    t1=$(now)
    printf '%8s %9.2fs\n' "$step" "$(echo "$t1 - $t0" | bc -l)"
  else
    sleep 2
  fi
done
kill -TERM "$PID"; wait "$PID" || true
fi

echo
echo "CPU use between scans, 1,000 files in the watched tree, ${IDLE}s idle"
rm -rf "$WORK/watch" && mkdir -p "$WORK/watch"
for d in $(seq 1 100); do
  mkdir -p "$WORK/watch/checkpoint-$d"
  for f in $(seq 1 10); do echo x > "$WORK/watch/checkpoint-$d/file-$f"; done
done
sed -i 's/^settle = .*/settle = "5s"/' "$WORK/pmad.toml"
"$PMAD" run --config "$WORK/pmad.toml" > "$WORK/pmad-idle.log" 2>&1 &
PID=$!
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
c0=$(ticks); t0=$(now)
sleep "$IDLE"
c1=$(ticks); t1=$(now)
hz=$(getconf CLK_TCK)
cpu=$(echo "($c1 - $c0) / $hz" | bc -l)
wall=$(echo "$t1 - $t0" | bc -l)
printf 'cpu %.2fs over %.0fs wall = %.3f%% of one core (%d scans)\n' "$cpu" "$wall" "$(echo "100 * $cpu / $wall" | bc -l)" "$(echo "$wall / 10" | bc)"
kill -TERM "$PID"; wait "$PID" || true
