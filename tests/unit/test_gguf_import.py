"""opsd/assets/gguf.py: what it refuses, naming the file and the reason, and leaving nothing behind.
The conversion of a real GGUF file is tested on SmolLM2 (tests/integration/test_smollm2.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opsd.assets.gguf import ModelImportError, gguf_architecture, import_gguf, supported_architectures

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(4, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quiet(msg: str) -> None:
    pass


def test_architecture_is_read_from_the_header(tmp_path):
    assert gguf_architecture(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"
    assert "llama" in supported_architectures() and "general" not in supported_architectures()


def test_an_unsupported_architecture_is_named(tmp_path):
    src = write_gguf(tmp_path / "m.gguf", "mamba9")
    with pytest.raises(ModelImportError, match=r"m\.gguf: GGUF architecture 'mamba9' is not one.*llama"):
        import_gguf(src, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    with pytest.raises(ModelImportError, match=r"notes\.gguf: not a readable GGUF file"):
        import_gguf(bad, tmp_path / "out", log=quiet)
    with pytest.raises(ModelImportError, match=r"missing\.gguf: no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", log=quiet)


def test_a_supported_architecture_that_transformers_cannot_load_leaves_nothing(tmp_path):
    # "llama" in the header, but none of a llama's metadata or tensors.
    src = write_gguf(tmp_path / "hollow.gguf", "llama")
    with pytest.raises(ModelImportError, match=r"hollow\.gguf: transformers could not load it"):
        import_gguf(src, tmp_path / "out", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hollow.gguf"]  # no temp dir, no out


def test_an_existing_directory_of_the_users_is_never_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelImportError, match="exists and is not an earlier import"):
        import_gguf(write_gguf(tmp_path / "m.gguf", "llama"), out, log=quiet)
    assert (out / "notes.txt").read_text() == "keep me"
