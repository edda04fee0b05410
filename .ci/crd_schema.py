#!/usr/bin/env python3
"""Turns a CustomResourceDefinition's openAPIV3Schema into a JSON Schema for check-jsonschema.

Used by .ci/lint-deploy.sh when CRD_DIR names a directory holding the upstream CRDs
(jobset.x-k8s.io_jobsets.yaml, leaderworkerset.x-k8s.io_leaderworkersets.yaml): the manifests
are then also validated against the controllers' own schemas, templates included. Nothing of
those CRDs is kept in this repository; deploy/schemas/ holds pmad's own schemas.

The conversion: `nullable: true` becomes a "null" type, and an object with `properties` and
neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` refuses unknown
fields (the API server's strict field validation, which `kubectl apply` uses). Other
`x-kubernetes-*` keys are left for the validator to ignore.

usage: crd_schema.py CRD.yaml VERSION > schema.json
"""

from __future__ import annotations

import json
import sys

import yaml


def convert(s: object) -> object:
    if isinstance(s, list):
        return [convert(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: convert(v) for k, v in s.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def main(path: str, version: str) -> int:
    with open(path, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    names = crd["spec"]["names"]
    group = crd["spec"]["group"]
    matches = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not matches:
        print(f"{path}: no version {version}", file=sys.stderr)
        return 1
    schema = convert(matches[0]["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": f"{group}/{version}"}
    props["kind"] = {"const": names["kind"]}
    props["metadata"] = {"type": "object"}  # ObjectMeta: the API server's, not the CRD's
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
    json.dump(schema, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
