#!/usr/bin/env bash
# Interleaved A/B of pmad merge variants on one checkpoint set. Usage: variants.sh DIR REPS CACHE(warm|cold) VARIANT...
set -euo pipefail
DIR=$1 REPS=$2 CACHE=$3; shift 3
MAIN=/work/main/target/release/pmad EXP=/tmp/pmad-exp/target/release/pmad
mapfile -t C < <(ls -d "$DIR"/checkpoint-* | sort -t- -k3 -n)
FILES=("${C[@]/%//model.safetensors}")
OUT=$DIR/exp-out
for ((r=1; r<=REPS; r++)); do
  for v in "$@"; do
    env=() bin=$EXP args=()
    case $v in
      main) bin=$MAIN ;;
      exp) ;;
      sfr) env=(PMAD_EXP_SFR=1) ;;
      noseq) env=(PMAD_EXP_NOSEQ=1) ;;
      norelease) env=(PMAD_EXP_NORELEASE=1) ;;
      pread) env=(PMAD_EXP_PREAD=1) ;;
      pread+sfr) env=(PMAD_EXP_PREAD=1 PMAD_EXP_SFR=1) ;;
      populate) env=(PMAD_EXP_POPULATE=1) ;;
      t1) bin=$MAIN args=(--threads 1) ;;
      t4) bin=$MAIN args=(--threads 4) ;;
      c1m) bin=$MAIN args=(--chunk-size 1MiB) ;;
      c16m) bin=$MAIN args=(--chunk-size 16MiB) ;;
      c64m) bin=$MAIN args=(--chunk-size 64MiB) ;;
      *) echo "unknown $v"; exit 1 ;;
    esac
    rm -rf "$OUT"; 
    if [[ $CACHE == cold ]]; then sync; for f in "${C[@]}"; do for g in "$f"/*.safetensors; do dd if="$g" iflag=nocache count=0 status=none; done; done
    else cat "$DIR"/checkpoint-*/*.safetensors > /dev/null; fi
    sync
    t0=$(date +%s%N)
    env "${env[@]}" /usr/bin/time -f '%M %U %S' -o /tmp/pmad-exp-run/.t "$bin" merge --method sma --out "$OUT" --force "${args[@]}" "${C[@]}" > /dev/null
    t1=$(date +%s%N)
    printf '%s\t%s\t%d\t%s\t%s\n' "$v" "$r" "$(( (t1-t0)/1000000 ))" "$(tail -1 /tmp/pmad-exp-run/.t)" "$(cut -d' ' -f1 /proc/loadavg)"
  done
done
rm -rf "$OUT"
