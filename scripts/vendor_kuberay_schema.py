"""Vendor the RayJob v1 schema of a KubeRay CRD file for tests/unit/test_kuberay.py.

    python scripts/vendor_kuberay_schema.py PATH/TO/ray.io_rayjobs.yaml COMMIT

Writes tests/data/kuberay/rayjob-v1.schema.json: the CRD's spec.versions[v1].schema.openAPIV3Schema
as JSON, field descriptions dropped (they do not take part in validation), with the source and
KubeRay's license in a "$comment". The CRDs live in ray-project/kuberay under
ray-operator/config/crd/bases/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay" / "rayjob-v1.schema.json"
LICENSE = ("Copyright The KubeRay Authors. Licensed under the Apache License, Version 2.0 "
           "(http://www.apache.org/licenses/LICENSE-2.0). Derived from ray-project/kuberay "
           "ray-operator/config/crd/bases/ray.io_rayjobs.yaml at commit {commit}: the openAPIV3Schema of "
           "version v1, with field descriptions removed.")


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    crd_file, commit = Path(argv[0]), argv[1]
    crd = yaml.safe_load(crd_file.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = {"$comment": LICENSE.format(commit=commit), **strip(v1["schema"]["openAPIV3Schema"])}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(schema, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
