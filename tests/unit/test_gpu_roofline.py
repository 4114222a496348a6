"""scripts/gpu_roofline.py runs on the CPU at a tiny shape (--tiny), so that a short GPU window is
not spent finding a typo in it, and its LoRA rows train the recipe's adapters."""

from __future__ import annotations

import importlib.util
import json

import pytest

from opsd.config import REPO_ROOT


def roofline():
    spec = importlib.util.spec_from_file_location("gpu_roofline", REPO_ROOT / "scripts" / "gpu_roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_roofline_runs_every_learner_row_on_the_cpu(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "roofline.json"
    rc = roofline().main(["--tiny", "--repeats", "1", "--parts", "learner", "--lengths", "64", "--checkpointing", "on",
                          "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["lora"], r["head_path"]): r for r in res["learner"]}
    assert set(rows) == {(False, "module"), (False, "fused"), (True, "module"), (True, "fused")}
    for r in rows.values():
        assert r["seconds"] > 0 and r["update_seconds"] > 0 and r["update_floor_seconds"]["measured"] > 0
    # LoRA trains the adapters alone: the frozen weights' backward is once their forward (no weight
    # gradients), the adapters' three times theirs (2 FLOPs per multiply-add per token)
    full, lora = rows[(False, "fused")], rows[(True, "fused")]
    assert lora["trainable_params"] < full["trainable_params"]
    assert lora["flops"] == pytest.approx(2 / 3 * full["flops"] + 3 * 2 * lora["trainable_params"] * lora["tokens"])
    assert "| LoRA | fused |" in res["table"]


def test_the_roofline_lora_is_the_recipes():
    from opsd.config import REPO_ROOT as root, load_config

    cfg = load_config(root / "configs" / "qwen3-1.7b.yaml", [])
    lora = cfg.model.lora
    assert roofline().RECIPE_LORA == {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                      "target_modules": list(lora.target_modules)}
