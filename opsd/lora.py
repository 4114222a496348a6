"""LoRA: the one peft configuration the learner trains and the rollout engines serve, and the
adapter's tensors under the names peft saves them (docs/DESIGN.md, "LoRA adapters on the engines").

With ``model.lora.serve=adapter`` a push carries the adapter alone (``lora_A`` and ``lora_B`` of
every adapted module: 37 MB in bf16 where the merged SmolLM2-135M is 257 MB), under the names of peft's
``adapter_model.safetensors``; a rollout engine loads it as a vLLM LoRA adapter over the base
weights it loaded at start, which it keeps, so the same engine can score a fixed teacher (the base,
adapters off) by prefill.
"""

from __future__ import annotations

from typing import Any

# The ranks vLLM's engine can be started for (vllm.config.lora.MaxLoRARanks); an adapter of a
# smaller rank is served by an engine started for the next one up.
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ADAPTER = "default"  # peft's name for the one adapter opsd trains


def peft_config(lc: Any) -> Any:
    """``model.lora`` (opsd.config.LoraConfig) -> peft.LoraConfig, for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM")


def saved_name(param_name: str) -> str | None:
    """A PeftModel parameter's name in a saved adapter (peft drops the adapter's own name), or
    None for a parameter that is not part of the adapter:
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.{ADAPTER}."
        if marker in param_name:
            return param_name.replace(marker, f".{part}.")
    return None


def vllm_max_rank(r: int) -> int:
    """The smallest rank a vLLM engine can be started for that serves an adapter of rank ``r``."""
    for rank in VLLM_MAX_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's largest ({VLLM_MAX_RANKS[-1]})")


def adapter_shapes(model_path: str, lc: Any, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """The saved adapter's tensor names and shapes for the model at ``model_path``, built on the
    meta device (what a receiver checks a push against before it loads anything)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code),
                               peft_config(lc))
    return {saved: tuple(p.shape) for name, p in model.named_parameters() if (saved := saved_name(name))}


def write_adapter(directory: str, named: list, lc: Any, base_model: str) -> None:
    """A pushed adapter as peft saves one (``adapter_model.safetensors`` and ``adapter_config.json``),
    which is the form vLLM loads an adapter from."""
    import os

    from safetensors.torch import save_file

    config = peft_config(lc)
    config.base_model_name_or_path = base_model
    config.save_pretrained(directory)
    # save_file copies: the tensors may view memory the receiver does not own (in_place)
    save_file({name: t.contiguous() for name, t in named}, os.path.join(directory, "adapter_model.safetensors"))
