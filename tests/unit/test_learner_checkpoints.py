"""workers/learner_checkpoints.py without DeepSpeed: the Hugging Face export of given weights (the
default run's test_cli_train checks it through a real learner group)."""

from __future__ import annotations

import torch

from opsd.config import REPO_ROOT, load_config
from opsd.workers.learner_checkpoints import Checkpoints


class GatheredWeights:
    """What WeightExport hands the export: the full weights in buckets, and the dtype they are served in."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.push_dtype = state, torch.float32

    def full_buckets(self):
        yield dict(self.state)


def test_the_export_holds_the_weights_and_keeps_the_models_own_generation_config(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"model.path={tiny_model}"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    state = {k: v + 0.5 for k, v in model.state_dict().items()}  # weights unlike the initial ones
    out = Checkpoints(cfg, tiny_model, 0, None, None, GatheredWeights(state)).export_hf(str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    # The tiny model's own stop ids are [2, 0]; save_pretrained alone would write its config's 2.
    assert GenerationConfig.from_pretrained(out).eos_token_id == GenerationConfig.from_pretrained(tiny_model).eos_token_id \
        == [2, 0]
