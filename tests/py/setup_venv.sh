#!/usr/bin/env bash
# Create (if missing) the repo-root virtualenv used by the Python test oracle and fixture
# generator, and install the pinned requirements into it. Idempotent: a second run only checks
# that the pinned versions are present. Prints the venv's python path as the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/.venv"
req="$here/requirements.txt"
py="${PYTHON:-python3}"

# Debian splits venv/ensurepip into python3-venv; install it when we can (root) and must.
if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup_venv: installing python3-venv" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    else
        echo "setup_venv: $py lacks the venv module; install python3-venv" >&2
        exit 1
    fi
fi

# A venv left half-made by an interrupted run has no working python: rebuild it.
if [ -d "$venv" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
fi
if [ ! -d "$venv" ]; then
    "$py" -m venv "$venv" >&2
fi

vpy="$venv/bin/python"
# Skip pip entirely when every pin is already satisfied (fast, and works offline).
if ! "$vpy" - "$req" >/dev/null 2>&1 <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
    "$vpy" -m pip install --disable-pip-version-check -q -r "$req" >&2
fi

echo "$vpy"
