"""GGUF files as Hugging Face model directories that transformers, vLLM and DeepSpeed all load.

A GGUF file (llama.cpp's format) carries the weights, often block-quantised, plus the config,
the tokenizer and the chat template as metadata. transformers can read it for the
architectures it lists in ``GGUF_SUPPORTED_ARCHITECTURES`` and dequantises every tensor on the
way in, but a model loaded that way refuses ``save_pretrained`` ("quantized with GGUF and is not
serializable"). So :func:`import_gguf` loads it, builds a plain model of the same config without
the quantisation marker, moves the dequantised tensors over, and writes that: fp32 safetensors,
``config.json``, ``generation_config.json`` and the tokenizer with its chat template.

The directory is written under a temporary name and renamed into place, with an
``opsd_import.json`` (source file, its SHA-256, architecture) written last: a directory holding
that file is a finished conversion, and an interrupted one leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from opsd.assets.wheels import say, sha256_of

MARKER = "opsd_import.json"


class ModelError(ValueError):
    """A model that cannot be used as given; the message names the directory or file and why."""


class ModelImportError(ModelError):
    """A file that cannot be turned into a model directory; the message names it and says why."""


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (e.g. "llama"), read from its header only."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - a dependency of opsd
        raise ModelImportError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError as exc:
        raise ModelImportError(f"{path}: a GGUF file without 'general.architecture' in its metadata") from exc
    except Exception as exc:  # the reader fails in many ways on a file that is not GGUF
        raise ModelImportError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The mapping also has sections for the metadata every file carries; they are no architecture.
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})


def is_imported(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file() and (out_dir / "config.json").is_file()


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None,
                source: str | None = None, log: Callable[[str], None] = say) -> Path:
    """Convert ``gguf_path`` into an HF model directory at ``out_dir`` (fp32 safetensors).

    Returns ``out_dir``. Refuses an ``out_dir`` that exists and is not an empty directory or a
    finished import (nothing of the user's is overwritten); a finished import is replaced.
    """
    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not src.is_file():
        raise ModelImportError(f"{src}: no such GGUF file")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_imported(out))):
        raise ModelImportError(f"{out} exists and is not an earlier import; choose another --out or remove it")
    arch = gguf_architecture(src)
    supported = supported_architectures()
    if arch not in supported:
        raise ModelImportError(
            f"{src}: GGUF architecture {arch!r} is not one transformers can dequantise; supported: {', '.join(supported)}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        log(f"opsd: dequantising {src.name} ({arch}, {src.stat().st_size / 2**20:.0f} MB) to float32")
        model, tokenizer = _load_dequantised(src)
        log(f"opsd: writing {model.num_parameters() / 1e6:.1f}M parameters, tokenizer and chat template")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": source or str(src), "source_sha256": sha256_of(src), "name": name or src.stem,
            "architecture": arch, "model_type": model.config.model_type, "dtype": "float32",
            "parameters": model.num_parameters(), "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # last: marks it complete
        _readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        log(f"opsd: model ready at {out} ({time.perf_counter() - t0:.0f}s)")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable(directory: Path) -> None:
    """mkdtemp makes a private directory; a model directory is as readable as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _load_dequantised(src: Path):
    """(plain fp32 model, tokenizer) with the GGUF file's weights, config and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as exc:  # transformers fails in many ways on a model it cannot load
        raise ModelImportError(f"{src}: transformers could not load it ({type(exc).__name__}: {exc})") from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse the model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # A tied head is one tensor under two names; anything else missing was not in the file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelImportError(f"{src}: the dequantised tensors do not fit {type(model).__name__}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelImportError(f"{src}: its metadata holds no chat template (tokenizer.chat_template); opsd "
                               "builds student and teacher prompts from one")
    return model.eval(), tokenizer
