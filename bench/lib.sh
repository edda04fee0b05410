# bench/lib.sh: the small helpers every bench script needs, sourced (not run) by
# merge_vs_floor.sh, dcp.sh, partition.sh, interference.sh and run.sh.

# Nanoseconds since the epoch, and the seconds between two such readings (3 decimals).
now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

# median FORMAT VALUE...: the median (mean of the middle two for an even count), printf'd.
median() {
  local fmt=$1
  shift
  printf '%s\n' "$@" | sort -g | awk -v f="$fmt" '{ v[NR] = $1 } END { printf f, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# The largest of the values.
maxof() { printf '%s\n' "$@" | sort -g | tail -n 1; }

# Percent of all CPUs' time idle (idle + iowait) over the next second.
idle_pct() {
  local a b
  a=$(awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  echo "$a $b" | awk '{ d = $4 - $2; print (d > 0 ? int(100 * ($3 - $1) / d) : 100) }'
}
# Whether an idle percentage means something else was running.
busy() { [[ $1 -lt 90 ]]; }
