#!/usr/bin/env bash
# bench/interference.sh: how much does pmad, running beside a trainer, slow the trainer down?
# (issue 15, part 4; docs/performance.md, "Beside the trainer").
#
# The trainer is examples/stand_in_trainer.rs: every step the same compute- and
# memory-bandwidth-bound work on every core, every --save-every steps a bf16 HF checkpoint of
# --ckpt-size written through a temp dir + rename and fsynced, the newest --keep kept. Each
# round runs it for --steps steps under each condition, in an order that rotates every round:
#   alone       the trainer alone
#   background  with `pmad run` watching its output dir, daemon.priority = "background" and
#               daemon.threads = "auto" (the defaults: nice 10, SCHED_BATCH, lowest
#               best-effort I/O level; a quarter of the cores, at least 1)
#   normal      the same with daemon.priority = "normal" and daemon.threads = nproc
# and optional ones that separate the causes (not run unless named in --conditions):
#   background-n  daemon.priority = "background" with daemon.threads = nproc
#   background-save0  the defaults with state.save_interval = "0s": the sums saved after
#                 every checkpoint (pmad's behaviour before that setting existed)
#   idle          daemon.priority = "normal", threads "auto", pmad started under
#                 `chrt --idle 0 ionice -c 3`: SCHED_IDLE (runs only on otherwise idle CPU
#                 time) and the idle I/O class; what a stronger background mode would do
# pmad's config: an SMA over the last 4 checkpoints published after every checkpoint and an
# EMA (alpha 0.2) published after every other, keep = 2 each, state.dir set (sums saved when
# state.save_interval says: by default when the trainer deletes a checkpoint they absorbed),
# settle 2s, JSON logs, /metrics on 127.0.0.1:--port; everything in a temp dir removed after
# each run.
#
# Per run it records the CPU time used by everything else on the machine while the trainer ran
# (all busy CPU time in /proc/stat less the trainer's and pmad's: other jobs, and kernel
# threads such as writeback): the noise indicator of a shared machine. It also records the trainer's step times (compute only; saves apart; wall per step, saves
# included) and, for pmad: checkpoints accepted (of those written) and lost, outputs
# published, bytes read per second of the trainer's run (pmad_read_bytes_total), CPU seconds
# (utime + stime from /proc), the lag of its outputs (merge.emitted lag: from the checkpoint's
# weights being written to its average being published) and the drain: how long after the
# trainer's last save the SMA of that checkpoint was published (pmad kept up if it needed
# about `settle` plus one arrival's work, not a backlog). Slowdowns are given as the median
# of the per-round ratios (condition / alone of the same round) and as the ratio of medians.
#
# Usage: bench/interference.sh [options]
#   --rounds R         rounds (default 5)
#   --steps N          trainer steps per run (default 600: ~25-30 s on 2 cores)
#   --passes P         trainer passes over its working set per step (default 4)
#   --work-mb M        trainer working set in MB (default 64)
#   --ckpt-size S      checkpoint size (default 128MB)
#   --save-every K     steps between checkpoints (default 80: one every ~3.5 s)
#   --keep N           checkpoints the trainer keeps (default 6)
#   --threads T        trainer threads (default 0: every core)
#   --conditions L     of alone,background,normal,background-n,background-save0,idle
#                      (default the first three)
#   --port P           pmad's /metrics port (default 39464)
#   --drain-timeout S  give up waiting for pmad to catch up after this (default 120)
#   --wait-idle S      before each run, wait up to S seconds for the CPUs to be >= 90% idle
#                      over one second (default 0: do not wait)
#   --dir D            work dir (default: a new mktemp -d under /tmp, removed at exit)
#   --raw FILE         also copy the per-run TSV here
#   --no-build         use the binaries already in target/release
#   -h, --help         this text
# Needs: cargo, curl, python3. Disk: about (keep + 1) x ckpt-size for the trainer plus
# about 8 x ckpt-size for pmad's outputs and state during a run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
ROUNDS=5 STEPS=600 PASSES=4 WORK_MB=64 CKPT=128MB SAVE_EVERY=80 KEEP=6 TTHREADS=0
CONDITIONS=alone,background,normal PORT=39464 DRAIN_TIMEOUT=120 DIR="" RAW="" BUILD=1 WAIT_IDLE=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench/interference.sh: $*" >&2; exit 1; }
log() { printf '[interference %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --passes) PASSES=$2; shift 2 ;;
    --work-mb) WORK_MB=$2; shift 2 ;;
    --ckpt-size) CKPT=$2; shift 2 ;;
    --save-every) SAVE_EVERY=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    --threads) TTHREADS=$2; shift 2 ;;
    --conditions) CONDITIONS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --drain-timeout) DRAIN_TIMEOUT=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --wait-idle) WAIT_IDLE=$2; shift 2 ;;
    --raw) RAW=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
[[ $SAVE_EVERY =~ ^[1-9][0-9]*$ ]] || die "--save-every must be a positive integer"
# The SMA-4 publishes once its window is full: the drain is measured on it.
(( STEPS / SAVE_EVERY >= 5 )) || die "--steps / --save-every must be at least 5 (saves)"
IFS=, read -r -a CONDS <<<"$CONDITIONS"
for c in "${CONDS[@]}"; do
  [[ $c =~ ^(alone|background|normal|background-n|background-save0|idle)$ ]] || die "unknown condition: $c"
done
command -v curl >/dev/null || die "curl not found"
command -v python3 >/dev/null || die "python3 not found"

cd "$ROOT"
if [[ $BUILD == 1 ]]; then
  log "building release binaries"
  cargo build --release --quiet --bin pmad --example stand_in_trainer
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PMAD=$TARGET/release/pmad
TRAINER=$TARGET/release/examples/stand_in_trainer
[[ -x $PMAD && -x $TRAINER ]] || die "binaries missing in $TARGET/release (build without --no-build)"

if [[ -n $DIR ]]; then
  mkdir -p "$DIR"
  WORK=$(mktemp -d "$DIR/interference-XXXX")
else
  WORK=$(mktemp -d /tmp/pmad-interference-XXXX)
fi
PMAD_PID="" TRAINER_PID=""
cleanup() {
  [[ -n $TRAINER_PID ]] && kill "$TRAINER_PID" 2>/dev/null || true
  [[ -n $PMAD_PID ]] && kill -TERM "$PMAD_PID" 2>/dev/null && wait "$PMAD_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NPROC=$(nproc)
LAST_STEP=$(( STEPS / SAVE_EVERY * SAVE_EVERY ))
SAVES=$(( STEPS / SAVE_EVERY ))
RAWTSV=$WORK/raw.tsv
printf 'round\tcond\tother_cpu_s\tcompute_med_ms\tcompute_p95_ms\tcompute_mean_ms\tsave_med_ms\twall_s\twall_per_step_ms\tpmad_cpu_s\tsaves\taccepted\tlost\temitted\tread_bytes\tdrain_s\tlag_med_s\tlag_max_s\n' > "$RAWTSV"

context() {
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $NPROC; $(grep -m1 'model name' /proc/cpuinfo | sed 's/\t//')"
  echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GB total, " $7 " GB available"}')"
  echo "cgroup: $(tr '\n' ' ' < /proc/self/cgroup)"
  local cpumax=/sys/fs/cgroup/cpu.max
  [[ -r $cpumax ]] && echo "cpu.max: $(cat "$cpumax")"
  [[ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]] && echo "cpu.cfs_quota_us: $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
  echo "kernel: $(uname -r); sched_autogroup_enabled: $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a)"
  local dev
  dev=$(df --output=source "$WORK" | tail -1)
  dev=${dev##*/}
  [[ -r /sys/block/$dev/queue/scheduler ]] && echo "I/O scheduler ($dev): $(cat "/sys/block/$dev/queue/scheduler")"
}

# Busy CPU ticks of the whole machine (user nice system irq softirq steal).
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
wait_idle() {
  [[ $WAIT_IDLE -gt 0 ]] || return 0
  local t0 idle
  t0=$(date +%s)
  while :; do
    idle=$(idle_pct)
    (( idle >= 90 )) && return 0
    if (( $(date +%s) - t0 >= WAIT_IDLE )); then log "machine still busy (${idle}% idle); running anyway"; return 0; fi
  done
}
# CPU seconds (utime + stime) of a process.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
metric() { # metric FILE NAME_WITH_LABELS: the value of one sample, 0 if absent
  awk -v m="$2" '$1 == m {v = $2} END {print v + 0}' "$1"
}

write_config() { # write_config DIR PRIORITY THREADS [SAVE_INTERVAL]
  local d=$1 save=""
  [[ -z ${4:-} ]] || save="save_interval = \"$4\""
  {
    cat <<TOML
[watch]
dir = "$d/ckpt"
layout = "hf"
settle = "2s"
poll_interval = "10s"

[phase]
lr_from_trainer_state = true

[state]
dir = "$d/state"
$save

[[recipe]]
name = "sma4"
method = "sma"
window = 4
emit_every = 1
out_dir = "$d/out/sma4"
keep = 2

[[recipe]]
name = "ema"
method = "ema"
alpha = 0.2
emit_every = 2
out_dir = "$d/out/ema"
keep = 2

[server]
listen = "127.0.0.1:$PORT"

[log]
format = "json"

[daemon]
priority = "$2"
TOML
    [[ $3 == auto ]] || echo "threads = $3"
  } > "$d/pmad.toml"
}

run_one() { # run_one ROUND COND
  local round=$1 cond=$2 d
  d=$WORK/r$round-$cond
  mkdir -p "$d/ckpt" "$d/out" "$d/state"
  local cpu0=0 cpu1=0 accepted=0 lost=0 emitted=0 readb=0 drain=NA lag_med=NA lag_max=NA
  if [[ $cond != alone ]]; then
    local prefix=()
    case $cond in
      background) write_config "$d" background auto ;;
      normal) write_config "$d" normal "$NPROC" ;;
      background-n) write_config "$d" background "$NPROC" ;;
      background-save0) write_config "$d" background auto 0s ;;
      idle) write_config "$d" normal auto; prefix=(chrt --idle 0 ionice -c 3) ;;
    esac
    "${prefix[@]}" "$PMAD" run --config "$d/pmad.toml" > "$d/pmad.log" 2>&1 &
    PMAD_PID=$!
    local i
    for i in $(seq 1 100); do
      curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
      kill -0 "$PMAD_PID" 2>/dev/null || { cat "$d/pmad.log" >&2; die "pmad exited at start"; }
      sleep 0.1
      [[ $i == 100 ]] && die "pmad did not answer /healthz on port $PORT"
    done
    cpu0=$(cpu_s "$PMAD_PID")
  fi
  local busy0 busy1
  busy0=$(busy_ticks)
  "$TRAINER" --out "$d/ckpt" --steps "$STEPS" --passes "$PASSES" --work-mb "$WORK_MB" \
    --ckpt-size "$CKPT" --save-every "$SAVE_EVERY" --keep "$KEEP" --threads "$TTHREADS" \
    --step-log "$d/steps.jsonl" > "$d/summary.json" 2> "$d/trainer.err" &
  TRAINER_PID=$!
  wait "$TRAINER_PID" || { cat "$d/trainer.err" >&2; die "the trainer failed"; }
  TRAINER_PID=""
  local t_end
  t_end=$(date +%s.%N)
  busy1=$(busy_ticks)
  if [[ $cond != alone ]]; then
    cpu1=$(cpu_s "$PMAD_PID")
    curl -sf "http://127.0.0.1:$PORT/metrics" > "$d/metrics.end" || : > "$d/metrics.end"
    # Drain: until the SMA of the last checkpoint is published.
    local latest=""
    while :; do
      latest=$(cat "$d/out/sma4/LATEST" 2>/dev/null || true)
      [[ $latest == "step-$LAST_STEP" ]] && break
      if (( $(date +%s) - ${t_end%.*} > DRAIN_TIMEOUT )); then break; fi
      sleep 0.05
    done
    if [[ $latest == "step-$LAST_STEP" ]]; then
      drain=$(python3 -c "import time; print(f'{time.time() - $t_end:.2f}')")
    else
      drain=">$DRAIN_TIMEOUT"
    fi
    curl -sf "http://127.0.0.1:$PORT/metrics" > "$d/metrics.drained" || : > "$d/metrics.drained"
    kill -TERM "$PMAD_PID"
    wait "$PMAD_PID" || true
    PMAD_PID=""
    accepted=$(metric "$d/metrics.end" pmad_checkpoints_accepted_total)
    lost=$(metric "$d/metrics.drained" pmad_checkpoints_lost_total)
    emitted=$(awk '/^pmad_merges_total\{/ && /result="ok"/ {s += $2} END {print s + 0}' "$d/metrics.end")
    readb=$(metric "$d/metrics.end" pmad_read_bytes_total)
    read -r lag_med lag_max < <(python3 - "$d/pmad.log" <<'PY'
import json, statistics, sys
lags = []
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "merge.emitted":
        s = e["lag"]
        lags.append(float(s[:-2]) / 1000 if s.endswith("ms") else float(s[:-1]))
print(f"{statistics.median(lags):.2f} {max(lags):.2f}" if lags else "NA NA")
PY
)
  fi
  python3 - "$d/summary.json" "$round" "$cond" "$(awk -v a="$cpu1" -v b="$cpu0" 'BEGIN {printf "%.2f", a - b}')" \
    "$accepted" "$lost" "$emitted" "$readb" "$drain" "$lag_med" "$lag_max" \
    "$(awk -v a="$busy1" -v b="$busy0" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (a - b) / hz}')" >> "$RAWTSV" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r, c, cpu, acc, lost, emitted, readb, drain, lm, lx, busy = sys.argv[2:]
c_ = s["compute_ms"]
other = float(busy) - (s.get("cpu_s") or 0) - (float(cpu) if c != "alone" else 0)
print("\t".join(str(x) for x in [r, c, f"{other:.2f}", c_["median"], c_["p95"], c_["mean"], s["save_ms"]["median"],
      s["wall_s"], s["wall_per_step_ms"], cpu if c != "alone" else "NA", s["saves"],
      acc if c != "alone" else "NA", lost if c != "alone" else "NA",
      emitted if c != "alone" else "NA", readb if c != "alone" else "NA", drain, lm, lx]))
PY
  tail -1 "$RAWTSV" | awk -F'\t' '{printf "  %-12s step median %s ms p95 %s ms, wall/step %s ms, pmad cpu %s s, accepted %s/%s, emitted %s, drain %s s, other cpu %s s\n", $2, $4, $5, $9, $10, $12, $11, $14, $16, $3}' >&2
  rm -rf "$d"
}

BEFORE=$(context)
LOAD_BEFORE=$(cat /proc/loadavg)
log "work dir $WORK; $ROUNDS rounds of ${CONDS[*]}; $STEPS steps, checkpoint $CKPT every $SAVE_EVERY steps"
T0=$(date +%s)
n=${#CONDS[@]}
for r in $(seq 1 "$ROUNDS"); do
  for k in $(seq 0 $((n - 1))); do
    cond=${CONDS[$(( (k + r - 1) % n ))]}
    wait_idle
    log "round $r/$ROUNDS: $cond"
    run_one "$r" "$cond"
  done
done
T1=$(date +%s)
LOAD_AFTER=$(cat /proc/loadavg)
[[ -n $RAW ]] && cp "$RAWTSV" "$RAW"

echo
echo "## Machine"
echo "$BEFORE"
echo "load average before: $LOAD_BEFORE"
echo "load average after:  $LOAD_AFTER"
echo "total time: $(( T1 - T0 )) s for $ROUNDS rounds"
echo "trainer: $STEPS steps, --passes $PASSES --work-mb $WORK_MB --threads $TTHREADS, checkpoint $CKPT every $SAVE_EVERY steps ($SAVES saves), keep $KEEP"
echo
python3 - "$RAWTSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
conds = [c for c in ["alone", "background", "normal", "background-n", "background-save0", "idle"] if any(r["cond"] == c for r in rows)]
by = {c: [r for r in rows if r["cond"] == c] for c in conds}
alone = {r["round"]: r for r in by.get("alone", [])}
med = statistics.median
def f(x):
    try:
        return float(x)
    except ValueError:
        return None
def col(c, k):
    return [f(r[k]) for r in by[c] if f(r[k]) is not None]
def ratios(c, k):
    return [f(r[k]) / f(alone[r["round"]][k]) for r in by[c] if r["round"] in alone]
def pct(x):
    return f"{(x - 1) * 100:+.1f}%"
print("## Trainer (medians over rounds; slowdown = median of per-round ratios to alone / ratio of medians)")
print()
print("| condition | step median | step p95 | slowdown (median) | slowdown (p95) | wall per step, saves incl. | slowdown (wall) | save median | other CPU s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in conds:
    line = [c, f"{med(col(c, 'compute_med_ms')):.1f} ms", f"{med(col(c, 'compute_p95_ms')):.1f} ms"]
    for k in ["compute_med_ms", "compute_p95_ms"]:
        if c == "alone" or not alone:
            line.append("")
        else:
            line.append(f"{pct(med(ratios(c, k)))} / {pct(med(col(c, k)) / med(col('alone', k)))}")
    line.append(f"{med(col(c, 'wall_per_step_ms')):.1f} ms")
    line.append("" if c == "alone" or not alone else
                f"{pct(med(ratios(c, 'wall_per_step_ms')))} / {pct(med(col(c, 'wall_per_step_ms')) / med(col('alone', 'wall_per_step_ms')))}")
    line.append(f"{med(col(c, 'save_med_ms')):.0f} ms")
    line.append(f"{med(col(c, 'other_cpu_s')):.1f}")
    print("| " + " | ".join(line) + " |")
print()
print("Per-round slowdown of the median step:")
for c in conds:
    if c != "alone" and alone:
        print(f"  {c}: " + " ".join(pct(x) for x in ratios(c, "compute_med_ms")))
pm = [c for c in conds if c != "alone"]
if pm:
    print()
    print("## pmad (medians over rounds; rates over the trainer's run)")
    print()
    print("| condition | accepted / written | lost | outputs published | checkpoints/s | read MB/s | CPU s (% of a core) | trainer s lost per pmad CPU s | lag median / max | drain after last save | kept up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in pm:
        rs = by[c]
        wall = med(col(c, "wall_s"))
        acc = med(col(c, "accepted"))
        saves = med(col(c, "saves"))
        cpu = med(col(c, "pmad_cpu_s"))
        drains = [r["drain_s"] for r in rs]
        numeric = [f(x) for x in drains if f(x) is not None]
        drain = f"{med(numeric):.1f} s" if len(numeric) == len(drains) else f"{len(drains) - len(numeric)} runs never caught up"
        rate = med([f(r["accepted"]) / f(r["wall_s"]) for r in rs])
        mbs = med([f(r["read_bytes"]) / f(r["wall_s"]) / 1e6 for r in rs])
        lost_per_cpu = [(f(r["wall_s"]) - f(alone[r["round"]]["wall_s"])) / f(r["pmad_cpu_s"])
                        for r in rs if r["round"] in alone and f(r["pmad_cpu_s"])]
        lpc = f"{med(lost_per_cpu):.2f}" if lost_per_cpu else ""
        lags = [f(r["lag_med_s"]) for r in rs if f(r["lag_med_s"]) is not None]
        lagx = [f(r["lag_max_s"]) for r in rs if f(r["lag_max_s"]) is not None]
        kept = all(f(r["accepted"]) >= f(r["saves"]) - 1 and f(r["lost"]) == 0 and f(r["drain_s"]) is not None and f(r["drain_s"]) < 10 for r in rs)
        print(f"| {c} | {acc:.0f} / {saves:.0f} | {med(col(c, 'lost')):.0f} | {med(col(c, 'emitted')):.0f} | {rate:.2f} | {mbs:.0f} | {cpu:.1f} ({100 * cpu / wall:.0f}%) | {lpc} | "
              f"{(med(lags) if lags else float('nan')):.1f} / {(max(lagx) if lagx else float('nan')):.1f} s | {drain} | {'yes' if kept else 'no'} |")
# Machine-readable lines for bench/run.sh's targets table: what, value, goal, unit.
if alone:
    print()
    for c in pm:
        step = (med(ratios(c, "compute_med_ms")) - 1) * 100
        wall = (med(ratios(c, "wall_per_step_ms")) - 1) * 100
        print(f"target\ttrainer step-time slowdown beside pmad, priority {c}\t{step:.1f}\t{3 if c == 'background' else '-'}\t%")
        print(f"target\ttrainer wall time per step incl. saves, slowdown, priority {c}\t{wall:.1f}\t-\t%")
print()
print("## Raw (one line per run)")
print()
print(open(sys.argv[1]).read())
PY
