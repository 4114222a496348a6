"""What a learner rank does before its first step: workers/deepspeed_compat.py's Muon import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A fresh interpreter: whether TorchInductor gets loaded depends on what was imported before.
PROBE = """
import json, os, sys
import torch
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
from opsd.workers.deepspeed_compat import import_muon_uncompiled
MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
import_muon_uncompiled()
seen = {"inductor": "torch._inductor.compile_fx" in sys.modules, "env": os.environ.get("TORCHDYNAMO_DISABLE"),
        "muon": sys.modules[MUON].MuonWithAuxAdam.__name__,
        "adamw_supported": torch.optim.AdamW in ZERO_SUPPORTED_OPTIMIZERS}
# The caller's own setting is put back too.
del sys.modules[MUON]
os.environ["TORCHDYNAMO_DISABLE"] = "0"
import_muon_uncompiled()
seen["env_set"] = os.environ.get("TORCHDYNAMO_DISABLE")
print(json.dumps(seen))
"""


def test_deepspeeds_muon_module_is_imported_without_loading_torchinductor():
    """ZeRO imports the Muon module in deepspeed.initialize; imported first by the rank, with
    TorchDynamo off and the caller's setting put back, it loads no Inductor, and ZeRO still takes
    AdamW (the optimizer opsd builds) as a supported optimizer."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "DS_ACCELERATOR": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "inductor": False, "env": None, "muon": "MuonWithAuxAdam", "adamw_supported": True, "env_set": "0"}
