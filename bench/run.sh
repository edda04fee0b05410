#!/usr/bin/env bash
# bench/run.sh: prove the speed. One command that measures, side by side and interleaved,
#   (a) floor     the I/O floor (examples/io_floor.rs): read every input byte once with 8 MiB
#                 reads, all input files at once (one reader thread per file, as pmad maps
#                 them all), then write as many bytes as the merged output holds (real
#                 checkpoint bytes) and fsync them; ratios are to this floor
#       floor1    the same with one reader, one file after the other (`dd`-like), for reference
#   (b) pmad      pmad merge --method sma (writes, fsyncs and publishes atomically)
#   (c) mergekit  mergekit-yaml, merge_method linear, dtype float32, out_dtype bfloat16
#   (d) torch     bench/peers/torch_avg.py: safetensors.torch load_file, f32 sum, bf16 save_file
# over K generated Llama-shaped HF checkpoints (examples/gen_ckpts.rs) for each size in a list,
# R repetitions each (the tool order rotates every repetition), on a warm page cache and,
# with --cold, on a cold one; then
#   (e) daemon    examples/daemon_bench.rs: the daemon's per-arrival update and SMA emission
#                 against their own floors (window K/2, one pass, no repetitions);
# checks that pmad, mergekit and torch agree (bench/peers/compare.py: names, shapes, dtypes,
# values within 1 bf16 ulp); then, in the same run, the other sections (--sections):
#   moe           bench/merge_vs_floor.sh --shape moe: 8 x 40 MB, ~9.4k tensors each, vs floor
#   dcp           bench/dcp.sh: 8 x 500 MB f32 torchtitan-style DCP checkpoints, pmad merge vs
#                 the floor and two torch routes (dcp.load; dcp_to_torch_save + torch.load);
#                 needs torch in the venv
#   kernels       merge_vs_floor.sh on the first size with --threads 1, for each merge kernel
#                 (PMAD_KERNEL=portable and the default): ratio to floor and CPU s per GB
#   memory        peak RSS of pmad merge over 64 MB checkpoints, K = 8/32/64 x threads 1/2/8
#   partition     bench/partition.sh: one merge split between 2 and 4 processes vs one
#   interference  bench/interference.sh: a stand-in trainer's step time alone and beside pmad
#                 (default settings, normal priority, and sums saved after every checkpoint)
# and writes bench/results/results.md (a Markdown table per size and section, every target
# of the performance work with its measured value, machine load), bench/results/raw.tsv
# (every dense run), bench/results/<section>.txt (each section's own report) and the plots
# bench/results/merge_time.png (time vs checkpoint size) and bench/results/targets.png.
#
# Wall times include the output's fsync for every tool: pmad and the floor fsync themselves;
# mergekit and torch do not, so `sync FILE...` on their output files runs inside the timed
# region (their time without it is in raw.tsv, column tool_s). Peak RSS is /usr/bin/time's %M.
# Before every warm run the inputs are read once (untimed) so they are in the page cache even
# after a peer's large allocations; before every cold run the inputs are evicted from the page
# cache (posix_fadvise DONTNEED on each file through `dd iflag=nocache`, which touches only
# this benchmark's files; --drop-caches uses `echo 3 > /proc/sys/vm/drop_caches` instead, root
# only, and slows everything else running on the machine).
#
# Usage: bench/run.sh [options]
#   --sizes LIST       tensor bytes per checkpoint, comma-separated (default 100MB,250MB,500MB)
#   --count K          checkpoints per size                 (default 8)
#   --dtype D          bf16, f16 or f32                      (default bf16)
#   --reps R           timed repetitions per tool and cache (default 3)
#   --cold             also run R cold-cache repetitions per tool
#   --drop-caches      make cold runs drop the whole page cache (root) instead of evicting inputs
#   --tools LIST       subset of floor,floor1,pmad,mergekit,torch (default all five)
#   --no-daemon        skip (e)
#   --sections LIST    of dense,moe,dcp,kernels,memory,partition,interference (default all;
#                      dense is (a)-(e))
#   --dir-prefix P     checkpoints go to P-<size>            (default /tmp/pmad-bench)
#   --results DIR      where results go                      (default bench/results)
#   --threads N        pmad --threads (default: all cores)
#   --setup            create bench/.venv (mergekit + matplotlib from PyPI, torch is the CUDA
#                      wheel: ~6 GB, ~3 min) if missing, then continue
#   --keep             keep the checkpoints afterwards (default: keep; they are reused next run)
#   --clean            remove the checkpoints of the measured sizes at the end
#   --smoke            CI mode, seconds: sizes 2MB,4MB, K=3, R=1, warm only, dir prefix
#                      /tmp/pmad-bench-smoke, results in /tmp/pmad-bench-smoke/results;
#                      mergekit/torch and the dcp section only if the venv exists (never
#                      installs it; with it they add ~25 s per size and ~30 s for dcp, mostly
#                      Python start-up); checks the outputs with
#                      `pmad inspect` and, when the venv exists, compare.py. The targets table
#                      is printed but means nothing at these sizes.
# Environment: PMAD_BENCH_VENV (default bench/.venv), CARGO_TARGET_DIR.
#   -h, --help         this text
# Needs: cargo, python3, /usr/bin/time (Debian package `time`), coreutils dd/sync.
# Disk: K x size of inputs per size, plus about 4 x size of outputs while it runs; the dcp
# section keeps 4 GB of DCP inputs in P-dcp and needs about 6 GB more while it runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
SIZES=100MB,250MB,500MB
K=8
DTYPE=bf16
REPS=3
COLD=0
DROP=0
TOOLS=floor,floor1,pmad,mergekit,torch
DAEMON=1
SECTIONS=dense,moe,dcp,kernels,memory,partition,interference
PREFIX=/tmp/pmad-bench
RESULTS=$ROOT/bench/results
THREADS=""
SETUP=0
CLEAN=0
SMOKE=0
VENV=${PMAD_BENCH_VENV:-$ROOT/bench/.venv}
# Pinned: what the published numbers were measured with.
PIP_PKGS=(mergekit==0.1.5 matplotlib==3.11.2)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "bench/run.sh: $*" >&2; exit 1; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

RESULTS_SET=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --sizes) SIZES=$2; shift 2 ;;
    --count) K=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --cold) COLD=1; shift ;;
    --drop-caches) COLD=1; DROP=1; shift ;;
    --tools) TOOLS=$2; shift 2 ;;
    --no-daemon) DAEMON=0; shift ;;
    --sections) SECTIONS=$2; shift 2 ;;
    --dir-prefix) PREFIX=$2; shift 2 ;;
    --results) RESULTS=$2; RESULTS_SET=1; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --keep) CLEAN=0; shift ;;
    --clean) CLEAN=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [[ $SMOKE == 1 ]]; then
  SIZES=2MB,4MB K=3 REPS=1 COLD=0 SETUP=0 CLEAN=1
  PREFIX=/tmp/pmad-bench-smoke
  [[ $RESULTS_SET == 1 ]] || RESULTS=$PREFIX/results
fi
[[ $K =~ ^[0-9]+$ && $K -ge 2 ]] || die "--count must be an integer >= 2"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "--reps must be a positive integer"
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
IFS=, read -r -a TOOL_LIST <<<"$TOOLS"
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (peak RSS): apt-get install time"
if [[ $DROP == 1 ]]; then
  { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null \
    || die "--drop-caches: cannot write /proc/sys/vm/drop_caches (not root, or a sandbox forbids it); use --cold alone"
fi

# --- python peers ------------------------------------------------------------------------------
want() { [[ ",$TOOLS," == *",$1,"* ]]; }
if [[ $SETUP == 1 && ! -x $VENV/bin/mergekit-yaml ]]; then
  log "creating $VENV (${PIP_PKGS[*]}; pulls torch + NVIDIA runtime wheels, ~6 GB, ~3 min)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
fi
HAVE_VENV=0
[[ -x $VENV/bin/mergekit-yaml && -x $VENV/bin/python ]] && HAVE_VENV=1
if [[ $HAVE_VENV == 0 ]]; then
  if want mergekit || want torch; then
    [[ $SMOKE == 1 ]] || die "$VENV is missing: rerun with --setup (or --tools floor,pmad)"
    log "no $VENV: skipping mergekit and torch (smoke mode never installs them)"
    mapfile -t TOOL_LIST < <(printf '%s\n' "${TOOL_LIST[@]}" | grep -v -x -e mergekit -e torch)
  fi
fi
PY=$VENV/bin/python
[[ $HAVE_VENV == 1 ]] || PY=python3
# The dcp section generates its checkpoints with torch: it needs only torch in the venv.
if [[ ",$SECTIONS," == *",dcp,"* ]]; then
  HAVE_TORCH=0
  [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null && HAVE_TORCH=1
  if [[ $HAVE_TORCH == 0 ]]; then
    [[ $SMOKE == 1 ]] || die "section dcp needs torch in $VENV: rerun with --setup (or leave dcp out of --sections)"
    log "no torch in $VENV: skipping the dcp section (smoke mode never installs it)"
    SECTIONS=${SECTIONS//dcp/}
  fi
fi

# --- build -------------------------------------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
log "cargo build --release (pmad, gen_ckpts, io_floor, daemon_bench)"
(cd "$ROOT" && cargo build --release --quiet --bin pmad --example gen_ckpts --example io_floor --example daemon_bench --example stand_in_trainer)
PMAD=$TARGET/release/pmad
GEN=$TARGET/release/examples/gen_ckpts
FLOOR=$TARGET/release/examples/io_floor
DBENCH=$TARGET/release/examples/daemon_bench

mkdir -p "$RESULTS"
RAW=$RESULTS/raw.tsv
LOG=$RESULTS/run.log
: >"$LOG"
printf 'size\tcache\ttool\trep\twall_s\ttool_s\trss_kb\tuser_s\tsys_s\tload1\n' >"$RAW"
DAEMON_TSV=$RESULTS/daemon.tsv
printf 'size\twindow\tupdate_s\tupdate_floor_s\temit_s\temit_floor_s\tacc\n' >"$DAEMON_TSV"
CHECKS=$RESULTS/checks.txt
: >"$CHECKS"
META=$RESULTS/meta.txt
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GB RAM", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
  echo "pmad: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (src modified)')"
  [[ $SMOKE == 1 ]] && echo "mode: smoke (tiny sizes: the targets below apply to 8 x 500 MB, not to this run)"
  echo "args: K=$K dtype=$DTYPE sizes=$SIZES reps=$REPS cold=$COLD drop_caches=$DROP tools=${TOOL_LIST[*]} threads=${THREADS:-default}"
  if [[ $HAVE_VENV == 1 ]]; then
    echo "peers: $("$VENV/bin/pip" freeze 2>/dev/null | grep -i -E '^(mergekit|torch|safetensors)==' | tr '\n' ' ')"
  fi
} >"$META"

load1() { cut -d' ' -f1 /proc/loadavg; }

mk_config() { # FILE CKPT...
  local f=$1 c
  shift
  {
    echo "merge_method: linear"
    echo "dtype: float32"
    echo "out_dtype: bfloat16"
    echo "models:"
    for c in "$@"; do
      printf '  - model: %s\n    parameters:\n      weight: 1.0\n' "$c"
    done
  } >"$f"
}

warm() { cat "${INPUT_FILES[@]}" >/dev/null; }
evict() {
  local f
  sync
  if [[ $DROP == 1 ]]; then
    echo 3 >/proc/sys/vm/drop_caches
  else
    for f in "${INPUT_FILES[@]}"; do dd if="$f" iflag=nocache count=0 status=none; done
  fi
}
resident_pct() { # percent of input pages in the page cache
  fincore -b -n -o RES,SIZE "${INPUT_FILES[@]}" 2>/dev/null \
    | awk '{ r += $1; s += $2 } END { if (s > 0) printf "%d", 100 * r / s; else print "?" }'
}

run_tool() { # SIZE CACHE TOOL REP
  local size=$1 cache=$2 tool=$3 rep=$4 out t0 t1 t2 rss user sys cmd=() syncs=()
  out=$DIR/out-$tool
  rm -rf "$out"
  case $tool in
    floor) cmd=("$FLOOR" --jobs "${#INPUT_FILES[@]}" --out "$DIR/floor.bin" --out-bytes "$OUT_BYTES" "${CKPTS[@]}") ;;
    floor1) cmd=("$FLOOR" --jobs 1 --out "$DIR/floor.bin" --out-bytes "$OUT_BYTES" "${CKPTS[@]}") ;;
    pmad) cmd=("$PMAD" merge --method sma --out "$out" --force ${THREADS:+--threads "$THREADS"} "${CKPTS[@]}") ;;
    mergekit) cmd=("$VENV/bin/mergekit-yaml" "$DIR/mergekit.yml" "$out" --no-copy-tokenizer --no-write-model-card --quiet) ;;
    torch) cmd=("$PY" "$ROOT/bench/peers/torch_avg.py" "$out" "${CKPTS[@]}") ;;
  esac
  if [[ $cache == cold ]]; then evict; else warm; fi
  sync
  local l
  l=$(load1)
  t0=$(now)
  /usr/bin/time -f '%M %U %S' -o "$DIR/.time" "${cmd[@]}" >>"$LOG" 2>&1 || die "$tool failed (size $size), see $LOG"
  t1=$(now)
  if [[ $tool == mergekit || $tool == torch ]]; then
    syncs=("$out"/*.safetensors)
    sync "${syncs[@]}"
  fi
  t2=$(now)
  read -r rss user sys < <(tail -n 1 "$DIR/.time")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$cache" "$tool" "$rep" \
    "$(secs "$t0" "$t2")" "$(secs "$t0" "$t1")" "$rss" "$user" "$sys" "$l" >>"$RAW"
  printf '  %-6s %-5s %-9s rep %d: %8s s  %6d MB RSS\n' "$size" "$cache" "$tool" "$rep" \
    "$(secs "$t0" "$t2")" "$((rss / 1024))" >&2
}

section() { [[ ",$SECTIONS," == *",$1,"* ]]; }
TARGETS=$RESULTS/targets.tsv
printf 'section\tcase\tmeasured\tgoal\tunit\n' >"$TARGETS"
target() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TARGETS"; }

# --- per size ----------------------------------------------------------------------------------
section dense || SIZE_LIST=()
for size in "${SIZE_LIST[@]}"; do
  DIR=$PREFIX-$size
  need_mb=$(awk -v s="$(numfmt --from=auto "${size%B}" 2>/dev/null || echo 0)" -v k="$K" 'BEGIN { printf "%d", s * (k + 4) / 1e6 }')
  mkdir -p "$DIR"
  free_mb=$(df -Pm "$DIR" | awk 'NR == 2 { print $4 }')
  [[ $need_mb -lt $free_mb ]] || die "$DIR: about $need_mb MB needed, $free_mb MB free"
  log "size $size: $K x $DTYPE checkpoints in $DIR"
  mapfile -t CKPTS < <("$GEN" --dir "$DIR" --count "$K" --size "$size" --dtype "$DTYPE" 2>>"$LOG")
  [[ ${#CKPTS[@]} -eq $K ]] || die "gen_ckpts returned ${#CKPTS[@]} checkpoints, wanted $K (see $LOG)"
  INPUT_FILES=()
  for c in "${CKPTS[@]}"; do
    for f in "$c"/*.safetensors; do INPUT_FILES+=("$f"); done
  done
  mk_config "$DIR/mergekit.yml" "${CKPTS[@]}"
  # Untimed warm-up run of pmad: binary in cache, and the output size for the floor.
  warm
  rm -rf "$DIR/out-pmad"
  "$PMAD" merge --method sma --out "$DIR/out-pmad" --force "${CKPTS[@]}" >>"$LOG" 2>&1 || die "pmad failed, see $LOG"
  OUT_BYTES=0
  for f in "$DIR/out-pmad"/*.safetensors; do OUT_BYTES=$((OUT_BYTES + $(stat -c %s "$f"))); done
  caches=(warm)
  [[ $COLD == 1 ]] && caches+=(cold)
  echo "$size idle_before $(idle_pct) load1_before $(load1)" >>"$META"
  for cache in "${caches[@]}"; do
    if [[ $cache == cold ]]; then
      evict
      echo "$size cold eviction check: $(resident_pct)% of input pages resident after evicting" >>"$META"
    fi
    n=${#TOOL_LIST[@]}
    for ((r = 1; r <= REPS; r++)); do
      for ((i = 0; i < n; i++)); do
        run_tool "$size" "$cache" "${TOOL_LIST[$(((i + r - 1) % n))]}" "$r"
      done
    done
  done
  echo "$size idle_after $(idle_pct) load1_after $(load1)" >>"$META"
  # Agreement of the last outputs, and pmad's own validation.
  "$PMAD" inspect "$DIR/out-pmad" >>"$LOG" 2>&1 || die "pmad inspect rejects $DIR/out-pmad, see $LOG"
  others=()
  for t in mergekit torch; do [[ -d $DIR/out-$t ]] && others+=("$DIR/out-$t"); done
  if [[ ${#others[@]} -gt 0 ]]; then
    if "$PY" "$ROOT/bench/peers/compare.py" "$DIR/out-pmad" "${others[@]}" >"$DIR/.cmp" 2>>"$LOG"; then
      sed "s/^/$size: /" "$DIR/.cmp" >>"$CHECKS"
    else
      sed "s/^/$size: /" "$DIR/.cmp" >>"$CHECKS"
      cat "$DIR/.cmp" >&2
      die "outputs disagree (size $size), see $CHECKS"
    fi
  fi
  rm -rf "$DIR"/out-* "$DIR/floor.bin" "$DIR/.time" "$DIR/.cmp"
  # (e) the daemon: per-arrival update and emission against their floors.
  if [[ $DAEMON == 1 ]]; then
    w=$((K / 2))
    log "size $size: daemon_bench --window $w"
    "$DBENCH" --window "$w" "${CKPTS[@]}" >"$DIR/.daemon" 2>>"$LOG" || die "daemon_bench failed, see $LOG"
    cat "$DIR/.daemon" >>"$LOG"
    awk -v s="$size" -v w="$w" '/^median update/ {
        line = $0; acc = line; sub(/.*accumulators /, "", acc)
        gsub(/s:?$/, "", $3); gsub(/s:?$/, "", $6); gsub(/s:?$/, "", $11); gsub(/s:?$/, "", $15)
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s, w, $3, $6, $11, $15, acc }' \
      "$DIR/.daemon" >>"$DAEMON_TSV"
    rm -f "$DIR/.daemon"
  fi
  [[ $CLEAN == 1 ]] && rm -rf "$DIR"
done

# --- the other sections ------------------------------------------------------------------------
# Each runs its own script (which times its cases interleaved, medians) and leaves its report in
# $RESULTS/<section>.txt; the numbers that have a goal go to targets.tsv.
R_SECT=$REPS
[[ $SMOKE == 1 ]] && R_SECT=1
FIRST=${SIZES%%,*}
vs_floor() { # LABEL-FILE ARGS...: run merge_vs_floor.sh, keep its report
  local f=$1
  shift
  bash "$ROOT/bench/merge_vs_floor.sh" --no-build --pmad "$PMAD" --reps "$R_SECT" "$@" \
    >"$f" 2>>"$LOG" || die "merge_vs_floor.sh $* failed, see $LOG"
}
ratio_of() { sed -n 's/^ratio pmad\/floor: \([0-9.]*\)x.*/\1/p' "$1"; }
ratio_tool() { sed -n "s/^ratio $1\\/floor: \\([0-9.]*\\)x.*/\\1/p" "$2"; } # TOOL REPORT
cpu_per_gb() { # REPORT: pmad CPU seconds per GB of input
  local cpu mb
  cpu=$(sed -n 's/.*pmad CPU (user+sys): median \([0-9.]*\) s.*/\1/p' "$1")
  mb=$(sed -n 's/^inputs \([0-9.]*\) MB read.*/\1/p' "$1")
  awk -v c="$cpu" -v m="$mb" 'BEGIN { if (m > 0) printf "%.3f", c / (m / 1000); else print "" }'
}
if section moe; then
  log "section moe: 8 x 40 MB MoE-shaped checkpoints vs floor"
  MK=8 MSZ=40MB
  [[ $SMOKE == 1 ]] && MK=3 MSZ=4MB
  vs_floor "$RESULTS/moe.txt" --shape moe --dir "$PREFIX-moe" --count "$MK" --size "$MSZ"
  target moe "pmad merge, MoE $MK x $MSZ (thousands of KB-sized tensors), ratio to floor" "$(ratio_of "$RESULTS/moe.txt")" 1.3 x
  # The daemon's per-arrival update on the same checkpoints.
  mapfile -t MOE_CK < <(find "$PREFIX-moe" -mindepth 1 -maxdepth 1 -type d -name 'checkpoint-*' | sort -V)
  "$DBENCH" --window "$(( ${#MOE_CK[@]} / 2 ))" "${MOE_CK[@]}" >"$RESULTS/.moe-daemon" 2>>"$LOG" \
    || die "daemon_bench on the MoE checkpoints failed, see $LOG"
  { echo; echo "daemon, per arrival (examples/daemon_bench.rs):"; grep '^median update' "$RESULTS/.moe-daemon"; } >>"$RESULTS/moe.txt"
  target moe "daemon per-arrival update, MoE $MK x $MSZ, ratio to its floor" \
    "$(sed -n 's/^median update [0-9.]*s vs floor [0-9.]*s: \([0-9.]*\)x.*/\1/p' "$RESULTS/.moe-daemon")" 1.5 x
  rm -f "$RESULTS/.moe-daemon"
fi
if section dcp; then
  DK=8 DSZ=500MB
  [[ $SMOKE == 1 ]] && DK=3 DSZ=4MB
  log "section dcp: $DK x $DSZ f32 DCP checkpoints, pmad vs floor and torch"
  bash "$ROOT/bench/dcp.sh" --no-build --pmad "$PMAD" --floor "$FLOOR" --python "$VENV/bin/python" \
    --reps "$R_SECT" --dir "$PREFIX-dcp" --count "$DK" --size "$DSZ" ${THREADS:+--threads "$THREADS"} \
    >"$RESULTS/dcp.txt" 2>>"$LOG" || die "dcp.sh failed, see $LOG and $RESULTS/dcp.txt"
  target dcp "pmad merge, DCP $DK x $DSZ, ratio to floor" "$(ratio_of "$RESULTS/dcp.txt")" 1.3 x
  target dcp "torch dcp.load route, DCP $DK x $DSZ, ratio to floor" "$(ratio_tool dcp_load "$RESULTS/dcp.txt")" "" x
  target dcp "torch dcp_to_torch_save route, DCP $DK x $DSZ, ratio to floor" "$(ratio_tool convert "$RESULTS/dcp.txt")" "" x
  [[ $CLEAN == 1 ]] && rm -rf "$PREFIX-dcp"
fi
if section kernels; then
  log "section kernels: --threads 1 on $FIRST, each kernel"
  : >"$RESULTS/kernels.txt"
  for kern in portable default; do
    if [[ $kern == portable ]]; then export PMAD_KERNEL=portable; else unset PMAD_KERNEL; fi
    vs_floor "$RESULTS/.kern-$kern" --dir "$PREFIX-$FIRST" --count "$K" --size "$FIRST" --threads 1
    { echo "### kernel: $kern"; cat "$RESULTS/.kern-$kern"; echo; } >>"$RESULTS/kernels.txt"
    target kernels "--threads 1 on $K x $FIRST, kernel $kern, ratio to floor" "$(ratio_of "$RESULTS/.kern-$kern")" "" x
    target kernels "CPU seconds per GB merged, kernel $kern" "$(cpu_per_gb "$RESULTS/.kern-$kern")" "" s/GB
    rm -f "$RESULTS/.kern-$kern"
  done
  unset PMAD_KERNEL
fi
if section memory; then
  log "section memory: peak RSS, K x threads"
  MSIZE=64MB KS=(8 32 64) TS=(1 2 8)
  [[ $SMOKE == 1 ]] && MSIZE=2MB KS=(2 4) TS=(1 2)
  MDIR=$PREFIX-mem-$MSIZE
  mapfile -t MCK < <("$GEN" --dir "$MDIR" --count "${KS[-1]}" --size "$MSIZE" --dtype "$DTYPE" 2>>"$LOG")
  {
    echo "peak RSS of pmad merge --method sma, ${KS[-1]} x $MSIZE $DTYPE checkpoints (the first K), default --memory-budget, warm cache"
    printf '%-4s %-8s %10s %10s %8s\n' K threads rss_MB wall_s cpu_s
  } >"$RESULTS/memory.txt"
  worst=0
  for k in "${KS[@]}"; do
    for t in "${TS[@]}"; do
      for c in "${MCK[@]:0:$k}"; do cat "$c"/*.safetensors >/dev/null; done
      rm -rf "$MDIR/out"
      /usr/bin/time -f '%M %e %U %S' -o "$MDIR/.time" "$PMAD" merge --method sma --threads "$t" \
        --out "$MDIR/out" "${MCK[@]:0:$k}" >>"$LOG" 2>&1 || die "pmad merge (memory K=$k t=$t) failed, see $LOG"
      read -r rss wall u sy < <(tail -n 1 "$MDIR/.time")
      printf '%-4s %-8s %10d %10s %8s\n' "$k" "$t" "$((rss / 1024))" "$wall" \
        "$(awk -v a="$u" -v b="$sy" 'BEGIN { printf "%.2f", a + b }')" >>"$RESULTS/memory.txt"
      (( rss / 1024 > worst )) && worst=$((rss / 1024))
    done
  done
  rm -rf "$MDIR/out" "$MDIR/.time"
  [[ $CLEAN == 1 ]] && rm -rf "$MDIR"
  target memory "peak RSS of pmad merge, worst of K = ${KS[*]} x threads ${TS[*]}" "$worst" 256 MB
fi
if section partition; then
  log "section partition: one merge split between 2 and 4 processes"
  if [[ $SMOKE == 1 ]]; then set -- --count 3 --size 8MB --shard-size 256KB; else set -- --count 8 --size 250MB; fi
  bash "$ROOT/bench/partition.sh" --no-build --reps "$R_SECT" --dir "$PREFIX-part" "$@" \
    >"$RESULTS/partition.txt" 2>>"$LOG" || die "partition.sh failed, see $LOG"
  target partition "2 processes x 1 thread, parts, vs one process x 1 thread" \
    "$(awk '/^2 processes/ { sub(/x$/, "", $7); print $7 }' "$RESULTS/partition.txt")" 0.6 x
  [[ $CLEAN == 1 ]] && rm -rf "$PREFIX-part"
fi
if section interference; then
  log "section interference: a stand-in trainer alone and beside pmad"
  if [[ $SMOKE == 1 ]]; then
    set -- --rounds 1 --steps 100 --save-every 20 --ckpt-size 8MB --work-mb 8
  else
    set -- --rounds "$((REPS > 5 ? REPS : 5))" --wait-idle 20 --conditions alone,background,normal,background-save0
  fi
  bash "$ROOT/bench/interference.sh" --no-build --raw "$RESULTS/interference.tsv" "$@" \
    >"$RESULTS/interference.txt" 2>>"$LOG" || die "interference.sh failed, see $LOG"
  while IFS=$'\t' read -r what value goal unit; do
    [[ $goal == - ]] && goal=""
    target interference "$what" "$value" "$goal" "$unit"
  done < <(sed -n 's/^target\t//p' "$RESULTS/interference.txt")
fi

# --- report ------------------------------------------------------------------------------------
"$PY" "$ROOT/bench/report.py" "$RESULTS" >&2
cat "$RESULTS/results.md"
