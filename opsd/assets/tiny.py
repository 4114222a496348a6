"""A tiny Qwen3-architecture model and tokenizer, built locally with no download.

The local debug run needs a model that vLLM (CPU) and transformers both load, that has Qwen3's
shape of chat template (including the `enable_thinking` switch), and that is small enough to
sample and train on two cores. `build_tiny_model` makes one from nothing:

- a byte-level BPE tokenizer (`tokenizers`) trained on the toy math set, with digits split one
  per token so that column arithmetic is learnable, and Qwen3's special tokens. The byte-level
  step runs without GPT-2's word-splitting regex, so merges may span spaces (" + ", ", write "):
  with 512 tokens that halves the toy solutions (mean 63 -> 38 tokens, max 111 -> 63);
- a randomly initialised `Qwen3ForCausalLM` (2 layers, d=128 by default, 0.46 M parameters).

Both are deterministic: the same arguments give byte-identical files.

Choices, for whoever wires this up:

- `head_dim=32`: vLLM's CPU attention backend supports head sizes 32, 64, 80, 96, 112, 128, 160,
  192, 224, 256 and 512 (`CPUAttentionBackend.get_supported_head_sizes`); 32 is the smallest, and
  4 heads x 32 = hidden 128, as in Qwen3 where heads x head_dim is the hidden size.
- `tie_word_embeddings=True`, as in Qwen3-0.6B/1.7B/4B (the sizes the paper recipes use): the
  safetensors file holds `model.embed_tokens.weight` and no `lm_head.weight`, so weight-sync
  code is exercised on the same parameter set it meets on the real 1.7B/4B models.
- Special tokens as Qwen3: `<|endoftext|>` is the pad token (and the config's bos id; there is
  no BOS prepended), `<|im_end|>` is the tokenizer's eos. The generation config stops on both,
  as Qwen3's does, and sets no sampling defaults (vLLM would pick them up as its defaults).
- `rope_theta = 1e6` as in Qwen3.
- Untrained, the model is degenerate: with tied embeddings and small random weights the last
  hidden state stays close to the last input embedding, so greedy decoding repeats the last
  prompt token. It needs SFT on the toy set before rewards mean anything.

Chat template (Qwen3 style, without tools): every message renders as
`<|im_start|>{role}\\n{content}<|im_end|>\\n`; the generation prompt is `<|im_start|>assistant\\n`.
With `enable_thinking=False` it is followed by an empty think block `<think>\\n\\n</think>\\n\\n`,
so the model answers directly. With `enable_thinking` true or not given, nothing follows: as in
Qwen3, the model is expected to open `<think>` itself.

transformers 5.19 `apply_chat_template` (checked):

- `tokenize=False` returns the string.
- `tokenize=True` returns a `BatchEncoding` (a dict with `input_ids` and `attention_mask`),
  because `return_dict` now defaults to True. `input_ids` is a plain `list[int]` for one
  conversation (no batch dimension) unless `return_tensors` is given.
- A plain `list[int]`: `tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
  enable_thinking=False, return_dict=False)`, or `[...]["input_ids"]` of the default.
- Extra keyword arguments (`enable_thinking=...`) are passed to the Jinja template as variables.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from opsd.assets.toydata import DEFAULT_TOY_DIR, read_jsonl
from opsd.config import REPO_ROOT

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END)  # ids 0..4

DEFAULT_TINY_DIR = REPO_ROOT / "artifacts" / "tiny-qwen3"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def tiny_dir() -> Path:
    """Where configs expect the tiny model: $OPSD_TINY_DIR, else `DEFAULT_TINY_DIR`."""
    env = os.environ.get("OPSD_TINY_DIR")
    return Path(env) if env else DEFAULT_TINY_DIR


def _default_corpus() -> list[str]:
    path = DEFAULT_TOY_DIR / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the tiny tokenizer is trained on it "
                                "(regenerate it with scripts/make_toy_data.py)")
    texts = []
    for row in read_jsonl(path):
        texts += [row["problem"], row["solution"]]
    return texts


def _chat_strings(texts: list[str]) -> list[str]:
    """Consecutive (prompt, response) pairs rendered as a chat, so that the template's fixed
    strings ("user\n", "assistant\n", the empty think block) are in the BPE's statistics."""
    return [f"{IM_START}user\n{texts[i]}{IM_END}\n"
            f"{IM_START}assistant\n{THINK_START}\n\n{THINK_END}\n\n{texts[i + 1]}{IM_END}\n"
            for i in range(0, len(texts) - 1, 2)]


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512,
                    model_max_length: int = 1024):
    """Train the byte-level BPE and wrap it as a `PreTrainedTokenizerFast` with the chat template.

    `corpus` defaults to the toy train set (each row's problem, then its solution). Training is
    deterministic for a given corpus (tested). Saved and reloaded with `AutoTokenizer`,
    transformers 5 gives back a `TokenizersBackend`, its name for the fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(_default_corpus() if corpus is None else corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # The special tokens are added before training, so they are never split inside the corpus.
    tok.train_from_iterator(texts + _chat_strings(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, THINK_START, THINK_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_model(out_dir: str | Path, *, vocab_size: int = 512, hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 32, intermediate_size: int = 384,
                     max_position_embeddings: int = 1024, seed: int = 0,
                     dtype: str = "float32", corpus: Iterable[str] | None = None) -> Path:
    """Write tokenizer, config, generation config and safetensors weights to `out_dir`.

    Overwrites files of the same name in `out_dir`. Weights are drawn from `torch.manual_seed
    (seed)` with Qwen3's initialiser (normal, std 0.02); the same arguments give byte-identical
    files. Returns `out_dir` as a Path.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus, vocab_size, max_position_embeddings)
    # A corpus with few distinct pairs can stop BPE short of vocab_size; the embedding keeps
    # vocab_size rows either way (the spare rows are never produced by the tokenizer).
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        dtype=dtype,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=[ids[IM_END], ids[PAD_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def ensure_tiny_model(out_dir: str | Path | None = None, **kw) -> Path:
    """The tiny model's directory, built first if it has no config.json.

    `out_dir` defaults to `tiny_dir()`. The build goes to a temporary sibling directory that is
    renamed into place, so an interrupted build never leaves a half-written model; when two
    processes race, the first rename wins and the other's copy is discarded.
    """
    out = Path(out_dir) if out_dir is not None else tiny_dir()
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_tiny_model(tmp, **kw)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError as e:
            if not (out / "config.json").exists():
                raise OSError(f"cannot put the tiny model at {out}: it exists without a "
                              f"config.json; remove it or set OPSD_TINY_DIR ({e})") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def token_lengths(tok, texts: Iterable[str]) -> list[int]:
    """Number of tokens of each text (no special tokens added)."""
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


__all__ = [
    "CHAT_TEMPLATE", "DEFAULT_TINY_DIR", "SPECIAL_TOKENS", "build_tiny_model", "build_tokenizer",
    "ensure_tiny_model", "tiny_dir", "token_lengths",
]
