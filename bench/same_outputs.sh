#!/usr/bin/env bash
# same_outputs.sh: do two pmad binaries write byte-identical outputs for the same inputs?
#
# A check for refactors that must not change behaviour: build pmad before and after, then
#   bench/same_outputs.sh /tmp/pmad-before target/release/pmad
# It builds fixtures in a temp dir, runs both binaries on them and compares what they write:
#   (a) pmad merge: methods sma, wma, ema (--alpha 0.3), weights (1,2,..,K) x output dtypes
#       source, bf16, f16, f32 x accumulators f32, f64, on every fixture set; plus, on the bf16
#       set, a small --shard-size (several output shards) and --threads 1 / --threads 2;
#   (b) pmad run (the daemon): all checkpoints are copied into a fresh watched dir before it
#       starts (it takes them in step order, so its outputs are deterministic); recipes sma
#       window 3, wma window 3, ema alpha 0.3, weights [1,2,3], sma window 3 dtype f32, ema
#       dtype f16 with a small shard_size; emit_every 1, keep 0. Runs with accumulators in RAM
#       and file-backed ([state] dir, memory_budget "4KB"), summing in f32 and in f64 (a
#       recipe publishing f32 makes the daemon sum in f64, so the f32-sum runs leave sma3-f32
#       out; each run's log is checked for the accumulator and placement it really used). The
#       daemon is stopped with SIGTERM once every recipe's LATEST names the last step (60 s
#       limit) and must exit 0. All its outputs are compared: every step-N dir, and LATEST.
# Fixture sets: gen-bf16 (examples/gen_ckpts.rs: 6 x 4MB Llama-shaped bf16 checkpoints),
# gen-f32-sh (4 x 4MB f32, each in 3 shards), fx-f16-sh (tests/py/fixtures.py: 4 tiny f16
# checkpoints in 3 shards, with edge values: subnormals, rounding ties, near-max, int and bool
# tensors, empty and scalar tensors), fx-bf16 and fx-f32 (the same, single file).
#
# Every output file is compared byte for byte (cmp), and the file lists (names, types, modes)
# must match, except merge.json, which is compared as JSON without `created_unix` and with
# the daemon's watched-dir prefix of the input paths normalised. Prints a table (case, files
# compared, identical) and exits 1 on any difference, showing the first differing file; for a
# .safetensors file, the first differing tensor, element and byte offset. merge.json's
# pmad_version is compared too: builds of different versions differ there.
#
# Usage: bench/same_outputs.sh [options] OLD_BIN NEW_BIN
#   --smoke     reduced matrix (< 30 s after the builds): gen-bf16 with 3 x 1MB and fx-f16-sh,
#               fewer dtype/accumulator combinations, two daemon runs (RAM and file-backed)
#   --keep      keep the temp dir (fixtures, outputs, logs) and print its path
#   -h, --help  this text
# Exit status: 0 all identical, 1 a difference (or a run that failed), 2 usage or setup error.
# Needs: cargo (only if target/release/examples/gen_ckpts is not built), python3 with venv
# (tests/py/setup_venv.sh makes .venv: numpy, safetensors, ml_dtypes), cmp, diff.
# Sanity check of the script itself: OLD_BIN = NEW_BIN must pass.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=0
KEEP=0
BINS=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "same_outputs: $*" >&2; exit 2; }
log() { echo "== $*" >&2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) BINS+=("$1"); shift ;;
  esac
done
[[ ${#BINS[@]} -eq 2 ]] || { usage >&2; die "need OLD_BIN and NEW_BIN"; }
abs() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
OLD=$(abs "${BINS[0]}") || die "${BINS[0]}: no such directory"
NEW=$(abs "${BINS[1]}") || die "${BINS[1]}: no such directory"
for b in "$OLD" "$NEW"; do
  [[ -f $b && -x $b ]] || die "$b is not an executable file"
done
command -v cmp >/dev/null || die "cmp not found (Debian package diffutils)"

START=$(date +%s)

# --- tools -----------------------------------------------------------------------------------
log "python venv (tests/py/setup_venv.sh)"
PY=$(bash "$ROOT/tests/py/setup_venv.sh" | tail -n 1)
[[ -x $PY ]] || die "setup_venv.sh did not give a python: $PY"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GEN=$TARGET/release/examples/gen_ckpts
if [[ ! -x $GEN ]]; then
  log "building gen_ckpts (cargo build --release --example gen_ckpts)"
  (cd "$ROOT" && cargo build --release --quiet --example gen_ckpts)
fi
[[ -x $GEN ]] || die "$GEN was not built"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pmad-same.XXXXXX")
DAEMON_PID="" # the daemon running now, if any (killed if this script stops early)
cleanup() {
  [[ -z $DAEMON_PID ]] || kill -KILL "$DAEMON_PID" 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then
    echo "same_outputs: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# Comparison helpers: merge.json as JSON, and where two safetensors files first differ.
cat >"$WORK/tools.py" <<'PYEOF'
import json, sys

def norm(v, pfx):
    if isinstance(v, dict):
        return {k: norm(x, pfx) for k, x in v.items() if k != "created_unix"}
    if isinstance(v, list):
        return [norm(x, pfx) for x in v]
    if isinstance(v, str) and pfx and v.startswith(pfx):
        return "<WATCH>" + v[len(pfx):]
    return v

def cmd_json(a, b, pa, pb):
    ja, jb = (json.load(open(p)) for p in (a, b))
    for j, name in ((ja, a), (jb, b)):
        if "created_unix" not in j:
            print(f"  {name}: no created_unix (format changed?)")
            return 1
    na, nb = norm(ja, pa), norm(jb, pb)
    if na == nb:
        return 0
    for k in sorted(set(na) | set(nb)):
        if na.get(k, "<absent>") != nb.get(k, "<absent>"):
            print(f"  merge.json key {k!r}: old {na.get(k, '<absent>')!r} new {nb.get(k, '<absent>')!r}")
    return 1

def header(buf):
    n = int.from_bytes(buf[:8], "little")
    return n, json.loads(buf[8:8 + n])

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
         "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

def cmd_st(a, b):
    import numpy as np
    import ml_dtypes
    ba, bb = open(a, "rb").read(), open(b, "rb").read()
    print(f"  sizes: old {len(ba)} new {len(bb)} bytes")
    n = min(len(ba), len(bb))
    x, y = np.frombuffer(ba, np.uint8, n), np.frombuffer(bb, np.uint8, n)
    ne = np.flatnonzero(x != y)
    if ne.size == 0:
        print(f"  identical for the first {n} bytes; one file is longer")
        return
    off = int(ne[0])
    print(f"  {ne.size} differing bytes in the common length; first at byte offset {off}")
    try:
        ha_len, ha = header(ba)
        hb_len, hb = header(bb)
    except Exception as e:
        print(f"  not a readable safetensors header: {e}")
        return
    if ha_len != hb_len or off < 8 + ha_len:
        print(f"  the headers differ (lengths old {ha_len} new {hb_len})")
        for k in sorted(set(ha) | set(hb)):
            if ha.get(k) != hb.get(k):
                print(f"  header entry {k!r}: old {ha.get(k)} new {hb.get(k)}")
                break
        return
    d = off - 8 - ha_len
    for name, e in ha.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        if s <= d < t:
            size = SIZES.get(e["dtype"], 1)
            idx = (d - s) // size
            dt = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
                  "F64": np.float64}.get(e["dtype"])
            lo = 8 + ha_len + s + idx * size
            va, vb = ba[lo:lo + size], bb[lo:lo + size]
            show = lambda raw: raw.hex() if dt is None else \
                f"{float(np.frombuffer(raw, dt)[0]):.9g} (bytes {raw.hex()})"
            va, vb = show(va), show(vb)
            base = 8 + ha_len
            cnt = int(((ne >= base + s) & (ne < base + t)).sum())
            print(f"  tensor {name!r} ({e['dtype']} {e['shape']}): flat element {idx} "
                  f"(data offset {d}): old {va} new {vb}; {cnt} differing bytes in it")
            return
    print(f"  data offset {d} is in no tensor (padding?)")

if __name__ == "__main__":
    if sys.argv[1] == "json":
        sys.exit(cmd_json(*sys.argv[2:6]))
    cmd_st(*sys.argv[2:4])
PYEOF

# --- fixtures --------------------------------------------------------------------------------
FIX=$WORK/fixtures
declare -A SET_STEPS # set name -> space-separated steps, oldest first

trainer_state() { # DIR STEP: the HF completion marker gen_ckpts does not write
  printf '{"global_step": %d, "log_history": [{"step": %d, "learning_rate": 0.001, "loss": 1.0}]}\n' \
    "$2" "$2" >"$1/trainer_state.json"
}

gen_set() { # NAME COUNT SIZE DTYPE SEED [SHARD_SIZE]
  local name=$1 count=$2 size=$3 dtype=$4 seed=$5 shard=${6:-5GB} i steps=""
  "$GEN" --dir "$FIX/$name" --count "$count" --size "$size" --dtype "$dtype" --seed "$seed" \
    --shard-size "$shard" >/dev/null 2>"$WORK/gen-$name.log" || {
    cat "$WORK/gen-$name.log" >&2
    die "gen_ckpts failed for $name"
  }
  for ((i = 1; i <= count; i++)); do
    trainer_state "$FIX/$name/checkpoint-$((1000 * i))" $((1000 * i))
    steps+="$((1000 * i)) "
  done
  SET_STEPS[$name]=${steps% }
}

fx_set() { # NAME COUNT DTYPE [SHARDS]
  local name=$1 count=$2 dtype=$3 shards=${4:-} i steps="" extra=()
  [[ -n $shards ]] && extra=(--sharded "$shards")
  for ((i = 1; i <= count; i++)); do
    "$PY" "$ROOT/tests/py/fixtures.py" make --out "$FIX/$name/checkpoint-$((100 * i))" \
      --dtype "$dtype" --seed "$i" --step $((100 * i)) "${extra[@]}" >/dev/null
    steps+="$((100 * i)) "
  done
  SET_STEPS[$name]=${steps% }
}

log "fixtures in $FIX"
if [[ $SMOKE == 1 ]]; then
  gen_set gen-bf16 3 1MB bf16 1
  fx_set fx-f16-sh 3 f16 3
else
  gen_set gen-bf16 6 4MB bf16 1
  gen_set gen-f32-sh 4 4MB f32 2 1500KB
  fx_set fx-f16-sh 4 f16 3
  fx_set fx-bf16 4 bf16
  fx_set fx-f32 4 f32
fi

inputs_of() { # SET: checkpoint paths, oldest first
  local s
  for s in ${SET_STEPS[$1]}; do
    echo "$FIX/$1/checkpoint-$s"
  done
}

# --- comparison ------------------------------------------------------------------------------
ROWS=()
FAILED=0
FIRST_DIFF=""

record() { # CASE FILES VERDICT
  ROWS+=("$1	$2	$3")
  if [[ $3 != yes ]]; then
    FAILED=1
    [[ -n $FIRST_DIFF ]] || FIRST_DIFF="$1: ${4:-}"
  fi
}

listing() { # DIR: relative paths with type and mode, sorted
  (cd "$1" && find . -mindepth 1 -printf '%P\t%y\t%m\n' | LC_ALL=C sort)
}

# compare CASE OLD_DIR NEW_DIR [OLD_PREFIX NEW_PREFIX]: records one table row. Compares every
# file; details are printed for the first differing one (and the first differing .safetensors
# file, which names the tensor and offset), the names of a few more after them.
compare() {
  local name=$1 a=$2 b=$3 pa=${4:-} pb=${5:-} la lb f type n=0 bad=() same st_shown=0
  la=$(listing "$a")
  lb=$(listing "$b")
  if [[ $la != "$lb" ]]; then
    echo "DIFF $name: the file lists differ (< old, > new):" >&2
    diff <(echo "$la") <(echo "$lb") | grep '^[<>]' | head -n 10 >&2 || true
    record "$name" "-" NO "file lists differ"
    return
  fi
  if ! grep -q '\.safetensors	f' <<<"$la"; then
    record "$name" 0 NO "no .safetensors output at all"
    return
  fi
  while IFS=$'\t' read -r f type _; do
    [[ $type == f ]] || continue
    n=$((n + 1))
    same=1
    if [[ ${f##*/} == merge.json ]]; then
      "$PY" "$WORK/tools.py" json "$a/$f" "$b/$f" "$pa" "$pb" >"$WORK/diff.txt" || same=0
    else
      cmp -s "$a/$f" "$b/$f" || same=0
    fi
    [[ $same == 1 ]] && continue
    bad+=("$f")
    if [[ ${#bad[@]} == 1 && ${f##*/} == merge.json ]]; then
      echo "DIFF $name: $f (as JSON, without created_unix)" >&2
      cat "$WORK/diff.txt" >&2
    elif [[ ${#bad[@]} == 1 || ($f == *.safetensors && $st_shown == 0) ]]; then
      echo "DIFF $name: $f" >&2
      cmp "$a/$f" "$b/$f" 2>&1 | sed 's/^/  /' >&2 || true
      if [[ $f == *.safetensors ]]; then
        "$PY" "$WORK/tools.py" st "$a/$f" "$b/$f" >&2
        st_shown=1
      fi
    fi
  done <<<"$la"
  if [[ ${#bad[@]} == 0 ]]; then
    record "$name" "$n" yes
    return
  fi
  if [[ ${#bad[@]} -gt 1 ]]; then
    echo "  also differ: ${bad[*]:1:5}$([[ ${#bad[@]} -le 6 ]] || echo " ...")" >&2
  fi
  record "$name" "$n" "NO (${#bad[@]} differ)" "${bad[0]}"
}

# --- (a) pmad merge --------------------------------------------------------------------------
MERGES=0
merge_case() { # CASE SET METHOD DTYPE ACC [EXTRA ARGS...]
  local name=$1 set=$2 method=$3 dtype=$4 acc=$5 which bin out rc slug
  shift 5
  slug=${name//[^A-Za-z0-9.-]/_}
  local inputs margs
  mapfile -t inputs < <(inputs_of "$set")
  margs=(--method "$method" --dtype "$dtype" --accumulator "$acc")
  case $method in
    ema) margs+=(--alpha 0.3) ;;
    weights) margs+=(--weights "$(seq -s, 1 "${#inputs[@]}")") ;;
  esac
  margs+=("$@")
  for which in old new; do
    bin=$OLD
    [[ $which == new ]] && bin=$NEW
    out=$WORK/merge/$which/$slug
    mkdir -p "$(dirname "$out")"
    rc=0
    "$bin" merge "${margs[@]}" --out "$out" "${inputs[@]}" >"$out.log" 2>&1 || rc=$?
    MERGES=$((MERGES + 1))
    if [[ $rc != 0 ]]; then
      echo "FAIL $name: $which pmad merge exited $rc:" >&2
      tail -n 5 "$out.log" | sed 's/^/  /' >&2
      record "$name" "-" NO "$which pmad merge exited $rc"
      return
    fi
  done
  compare "$name" "$WORK/merge/old/$slug" "$WORK/merge/new/$slug"
}

METHODS=(sma wma ema weights)
if [[ $SMOKE == 1 ]]; then
  log "pmad merge: reduced matrix"
  for m in "${METHODS[@]}"; do
    for d in source f32; do
      merge_case "merge gen-bf16 $m $d acc-f32" gen-bf16 "$m" "$d" f32
    done
    merge_case "merge fx-f16-sh $m bf16 acc-f32" fx-f16-sh "$m" bf16 f32
  done
  merge_case "merge gen-bf16 sma source acc-f64" gen-bf16 sma source f64
  merge_case "merge fx-f16-sh ema source acc-f64" fx-f16-sh ema source f64
  merge_case "merge gen-bf16 sma f32 shard-256KB" gen-bf16 sma f32 f32 --shard-size 256KB
  merge_case "merge gen-bf16 wma source threads-1" gen-bf16 wma source f32 --threads 1
  merge_case "merge gen-bf16 wma source threads-2" gen-bf16 wma source f32 --threads 2
else
  log "pmad merge: full matrix"
  for set in gen-bf16 gen-f32-sh fx-f16-sh fx-bf16 fx-f32; do
    for m in "${METHODS[@]}"; do
      for d in source bf16 f16 f32; do
        for acc in f32 f64; do
          merge_case "merge $set $m $d acc-$acc" "$set" "$m" "$d" "$acc"
        done
      done
    done
  done
  merge_case "merge gen-bf16 sma source shard-1MB" gen-bf16 sma source f32 --shard-size 1MB
  merge_case "merge gen-bf16 weights f32 shard-1MB" gen-bf16 weights f32 f64 --shard-size 1MB
  merge_case "merge gen-bf16 wma source threads-1" gen-bf16 wma source f32 --threads 1
  merge_case "merge gen-bf16 wma source threads-2" gen-bf16 wma source f32 --threads 2
  merge_case "merge gen-f32-sh ema f32 threads-1" gen-f32-sh ema f32 f64 --threads 1
  merge_case "merge gen-f32-sh ema f32 threads-2" gen-f32-sh ema f32 f64 --threads 2
fi

# --- (b) pmad run ----------------------------------------------------------------------------
# Recipes by name. A recipe publishing f32 (sma3-f32, or dtype source on f32 checkpoints)
# makes the daemon accumulate in f64 whatever [state] accumulator says, so the f32
# accumulator is only exercised by runs without one.
recipe_toml() { # NAME OUT_DIR
  local m
  case $1 in
    sma3) m='method = "sma"
window = 3' ;;
    wma3) m='method = "wma"
window = 3' ;;
    ema) m='method = "ema"
alpha = 0.3' ;;
    weights) m='method = "weights"
weights = [1, 2, 3]' ;;
    sma3-f32) m='method = "sma"
window = 3
dtype = "f32"' ;;
    ema-f16) m='method = "ema"
alpha = 0.3
dtype = "f16"
shard_size = "1MB"' ;;
    *) die "unknown recipe $1" ;;
  esac
  printf '[[recipe]]\nname = "%s"\n%s\nemit_every = 1\nkeep = 0\nout_dir = "%s"\n\n' "$1" "$m" "$2/$1"
}
RECIPES_BASE="sma3 wma3 ema weights ema-f16"
RECIPES_ALL="$RECIPES_BASE sma3-f32"

write_config() { # FILE WATCH OUT STATE_DIR ACC RECIPES
  local r
  {
    printf '[watch]\ndir = "%s"\nsettle = "0s"\npoll_interval = "200ms"\n\n' "$2"
    printf '[state]\naccumulator = "%s"\n' "$5"
    [[ -z $4 ]] || printf 'dir = "%s"\nmemory_budget = "4KB"\n' "$4"
    printf '\n[server]\nlisten = ""\n\n[daemon]\nshutdown_grace = "10s"\n\n'
    for r in $6; do
      recipe_toml "$r" "$3"
    done
  } >"$1"
}

# run_daemon BIN DIR SET FILE_BACKED ACC RECIPES: returns 0 on a clean run, else says why.
run_daemon() {
  local bin=$1 dir=$2 set=$3 file=$4 acc=$5 recipes=$6 last pid r t0 rc ready state=""
  mkdir -p "$dir/watch" "$dir/out"
  cp -a "$FIX/$set/." "$dir/watch/"
  [[ $file == 1 ]] && state=$dir/state
  write_config "$dir/pmad.toml" "$dir/watch" "$dir/out" "$state" "$acc" "$recipes"
  last=${SET_STEPS[$set]##* }
  "$bin" run --config "$dir/pmad.toml" >"$dir/daemon.log" 2>&1 &
  pid=$!
  DAEMON_PID=$pid
  t0=$(date +%s)
  while :; do
    ready=1
    for r in $recipes; do
      if [[ $(cat "$dir/out/$r/LATEST" 2>/dev/null) != "step-$last" ]]; then
        ready=0
        break
      fi
    done
    [[ $ready == 1 ]] && break
    if ! kill -0 "$pid" 2>/dev/null || [[ $(ps -o stat= -p "$pid") == Z* ]]; then
      rc=0
      wait "$pid" || rc=$?
      DAEMON_PID=""
      echo "daemon exited early with status $rc; log tail:" >&2
      tail -n 10 "$dir/daemon.log" | sed 's/^/  /' >&2
      return 1
    fi
    if (($(date +%s) - t0 >= 60)); then
      echo "timed out after 60 s waiting for every recipe's LATEST to name step-$last" \
        "(recipe $r has: $(cat "$dir/out/$r/LATEST" 2>/dev/null || echo nothing)); log tail:" >&2
      tail -n 10 "$dir/daemon.log" | sed 's/^/  /' >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      DAEMON_PID=""
      return 1
    fi
    sleep 0.1
  done
  kill -TERM "$pid"
  t0=$(date +%s)
  while ps -o stat= -p "$pid" | grep -qv '^Z'; do
    if (($(date +%s) - t0 >= 30)); then
      echo "daemon did not exit within 30 s of SIGTERM; killed" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      DAEMON_PID=""
      return 1
    fi
    sleep 0.1
  done
  rc=0
  wait "$pid" || rc=$?
  DAEMON_PID=""
  if [[ $rc != 0 ]]; then
    echo "daemon exited with status $rc after SIGTERM; log tail:" >&2
    tail -n 10 "$dir/daemon.log" | sed 's/^/  /' >&2
    return 1
  fi
}

# daemon_case CASE SET FILE_BACKED ACC RECIPES USED: USED is the accumulator the daemon is
# expected to use (its log line window.accumulator is checked, so the case covers what its name
# says; a mismatch is a warning, since logs are not outputs).
daemon_case() {
  local name=$1 set=$2 file=$3 acc=$4 recipes=$5 used=$6 which bin dir placement=ram slug
  slug=${name//[^A-Za-z0-9.-]/_}
  [[ $file == 1 ]] && placement="file"
  for which in old new; do
    bin=$OLD
    [[ $which == new ]] && bin=$NEW
    dir=$WORK/daemon/$which/$slug
    if ! run_daemon "$bin" "$dir" "$set" "$file" "$acc" "$recipes"; then
      echo "FAIL $name: $which daemon run failed (above; log $dir/daemon.log)" >&2
      record "$name" "-" NO "$which daemon run failed"
      return
    fi
    grep -q "window.accumulator.* accumulator=$used placement=$placement" "$dir/daemon.log" ||
      echo "WARNING $name: the $which daemon's log has no 'accumulator=$used" \
        "placement=$placement' line: this case may not test what its name says" >&2
  done
  compare "$name" "$WORK/daemon/old/$slug/out" "$WORK/daemon/new/$slug/out" \
    "$WORK/daemon/old/$slug/watch" "$WORK/daemon/new/$slug/watch"
}

log "pmad run: daemon cases"
# Names say where the sums live and in which precision.
daemon_case "daemon gen-bf16 ram acc-f64 (+sma3-f32)" gen-bf16 0 f32 "$RECIPES_ALL" f64
daemon_case "daemon gen-bf16 file-backed acc-f32" gen-bf16 1 f32 "$RECIPES_BASE" f32
if [[ $SMOKE == 0 ]]; then
  daemon_case "daemon gen-bf16 ram acc-f32" gen-bf16 0 f32 "$RECIPES_BASE" f32
  daemon_case "daemon gen-bf16 file-backed acc-f64 (+sma3-f32)" gen-bf16 1 f32 "$RECIPES_ALL" f64
  daemon_case "daemon gen-f32-sh ram acc-f64 (f32 source)" gen-f32-sh 0 f32 "$RECIPES_ALL" f64
  daemon_case "daemon gen-f32-sh file-backed acc-f64 (f32 source)" gen-f32-sh 1 f64 "$RECIPES_ALL" f64
  daemon_case "daemon fx-f16-sh ram acc-f32" fx-f16-sh 0 f32 "$RECIPES_BASE" f32
  daemon_case "daemon fx-f16-sh file-backed acc-f64 (+sma3-f32)" fx-f16-sh 1 f64 "$RECIPES_ALL" f64
fi

# --- summary ---------------------------------------------------------------------------------
echo
printf '%-52s %6s  %s\n' case files identical
ndiff=0
for row in "${ROWS[@]}"; do
  IFS=$'\t' read -r c n v <<<"$row"
  printf '%-52s %6s  %s\n' "$c" "$n" "$v"
  [[ $v == yes ]] || ndiff=$((ndiff + 1))
done
echo
echo "old: $OLD"
echo "new: $NEW"
echo "${#ROWS[@]} cases ($MERGES pmad merge runs), $ndiff different; $(($(date +%s) - START)) s"
if [[ $FAILED == 1 ]]; then
  echo "DIFFERENT: first difference: $FIRST_DIFF"
  exit 1
fi
echo "IDENTICAL: every case"
