"""The learner rank's checkpoints: DeepSpeed's own (weights, optimizer, the step) and Hugging Face
weights (docs/DESIGN.md, "The learner"; launch/checkpoints.py keeps the run's directory of them).

DeepSpeed's checkpoint is what a resumed run restores; it is loaded with tensors only, never
unpickled (workers/deepspeed_compat.py). The Hugging Face export is the weights as the rollout
engines load them (LoRA merged, the push dtype), with the tokenizer. Knows nothing of the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from opsd.config import Config
from opsd.workers.deepspeed_compat import load_checkpoints_as_tensors
from opsd.workers.learner_export import WeightExport
from opsd.workers.learner_training import Training


class Checkpoints:
    """Save and restore one rank's engine and step; export the weights in Hugging Face's format."""

    def __init__(self, cfg: Config, model_path: str, rank: int, engine: Any, training: Training,
                 export: WeightExport):
        self.cfg, self.model_path, self.rank, self.engine = cfg, model_path, rank, engine
        self.training, self.export = training, export

    def save_checkpoint(self, ckpt_dir: str) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag="learner", client_state={"step": self.training.step})

    def load_checkpoint(self, ckpt_dir: str) -> int:
        load_checkpoints_as_tensors(self.engine)  # never unpickle what is on disk
        with self.export.changing():
            _, client = self.engine.load_checkpoint(ckpt_dir, tag="learner")
        self.training.step = int((client or {}).get("step", 0))
        return self.training.step

    def export_hf(self, out_dir: str) -> str | None:
        """HF-format weights (LoRA merged) that transformers and vLLM load directly."""
        state = {}
        for bucket in self.export.full_buckets():
            state.update(bucket)
        if self.rank != 0:
            return None
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.cfg.model.trust_remote_code)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.to(self.export.push_dtype).save_pretrained(out_dir)
        try:
            # The model's own generation settings, not the ones save_pretrained derives from its
            # config: vLLM stops on their eos ids, and a teacher.model read from this export must
            # stop where the student does (opsd/vocab.py compares them).
            GenerationConfig.from_pretrained(self.model_path).save_pretrained(out_dir)
        except OSError:
            pass  # the model has no generation_config.json: the one derived from its config stays
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)
        return out_dir
