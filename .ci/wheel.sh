#!/usr/bin/env bash
# Builds the Python wheel of pmad (pyproject.toml: maturin, binary bindings), checks that its
# manylinux tag is honest, installs it into a fresh venv and runs the installed `pmad`.
#
#   bash .ci/wheel.sh            # after `cargo build --release` (its target dir is reused)
#
# The manylinux tag is the glibc the binary needs: the newest GLIBC_x.y symbol version it
# imports (objdump -T) gives manylinux_2_y; maturin's own audit refuses a tag that is too old,
# and auditwheel (an independent audit) must report the same tag. Build tools come from
# .ci/requirements-wheel.txt into .venv-wheel/ (reused while the requirements are unchanged).
# The wheel is left in target/wheels/.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${WHEEL_VENV:-.venv-wheel}
REQS=.ci/requirements-wheel.txt
OUT=target/wheels
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
t0=$SECONDS
step() { printf -- '-- %s (%ds)\n' "$*" $((SECONDS - t0)); }

step "build tools (${VENV}, from ${REQS})"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" > "$stamp"
fi
"$VENV/bin/maturin" --version
"$VENV/bin/auditwheel" --version

step "glibc the binary needs"
bin=target/release/pmad
[[ -x $bin ]] || cargo build --release --quiet
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2,2n -u | tail -n1)
minor=${glibc#GLIBC_2.}
tag=manylinux_2_${minor}
echo "$bin needs $glibc (newest symbol version): $tag"

step "maturin build --release --compatibility $tag"
rm -rf "$OUT"
# The same target dir as `cargo build --release`, whose binary it packs as is (no relink).
"$VENV/bin/maturin" build --release --locked --compatibility "$tag" --out "$OUT" --quiet
wheel=$(ls "$OUT"/pmad-*.whl)
echo "$wheel: $(du -h "$wheel" | cut -f1) ($(stat -c %s "$wheel") bytes)"
case $(basename "$wheel") in
    *-py3-none-${tag}_x86_64.whl | *-py3-none-${tag}_aarch64.whl) ;;
    *) echo "FAIL: $wheel does not carry the tag $tag" >&2; exit 1 ;;
esac

step "auditwheel show"
"$VENV/bin/auditwheel" show "$wheel" | tee "$TMP/audit.txt"
# auditwheel names the tag the wheel is consistent with (its text wraps lines).
consistent=$(tr '\n' ' ' < "$TMP/audit.txt" | grep -o 'consistent with the following platform tag: *"[^"]*"' | grep -o '"[^"]*"' | tr -d '"')
if [[ $consistent != "${tag}_$(uname -m)" ]]; then
    echo "FAIL: auditwheel says the wheel is consistent with '$consistent', the wheel says $tag" >&2
    exit 1
fi

step "metadata"
python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())' "$wheel" > "$TMP/METADATA"
for field in "Summary: " "License: Apache-2.0" "Project-URL: " "Classifier: " \
    "Description-Content-Type: text/markdown"; do
    grep -q "^$field" "$TMP/METADATA" || { echo "FAIL: no '$field' in METADATA" >&2; exit 1; }
done
grep -q "^# pmad" "$TMP/METADATA" || { echo "FAIL: README is not the long description" >&2; exit 1; }

step "install into a fresh venv"
python3 -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$wheel"
installed=$TMP/venv/bin/pmad
[[ -x $installed ]] || { echo "FAIL: the wheel did not install a pmad script" >&2; exit 1; }
version=$("$installed" --version)
echo "$version"
want_version="pmad $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
[[ $version == "$want_version" ]] || { echo "FAIL: '$version' != '$want_version'" >&2; exit 1; }

step "pmad demo (small: 12 checkpoints of 64K parameters)"
(cd "$TMP" && PATH="$TMP/venv/bin:$PATH" pmad demo --checkpoints 12 --every 20ms --params 65536) \
    > "$TMP/demo.txt"
tail -n 4 "$TMP/demo.txt"
# The summary row of each recipe: "pmad sma8   <outputs> ..." with at least one output.
for recipe in sma8 ema0.2; do
    grep -Eq "^pmad $recipe +[1-9]" "$TMP/demo.txt" ||
        { echo "FAIL: the demo published no $recipe output" >&2; exit 1; }
done

step "ok"
