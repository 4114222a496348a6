"""Checkpoint manifests and the choice of the checkpoint to resume from, on real folders."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from opsd.launch.checkpoints import MANIFEST, checkpoint_problem, latest_checkpoint, write_manifest
from opsd.launch.stopping import StopSignals


def make_checkpoint(run: Path, step: int, *, manifest: bool = True) -> Path:
    d = run / "checkpoints" / f"step_{step}"
    (d / "learner" / "global_step1").mkdir(parents=True)
    (d / "learner" / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (d / "learner" / "latest").write_text("global_step1")
    (d / "driver_state.json").write_text(json.dumps({"step": step}))
    if manifest:
        write_manifest(d)
    return d


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    import hashlib

    d = make_checkpoint(tmp_path, 2)
    files = json.loads((d / MANIFEST).read_text())["files"]
    on_disk = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and f.name != MANIFEST)
    assert sorted(files) == on_disk
    for name, entry in files.items():
        body = (d / name).read_bytes()
        assert entry == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert checkpoint_problem(d) is None


@pytest.mark.parametrize("damage, says", [
    ("flip", "does not match its checksum"),
    ("truncate", "has 100 bytes, its manifest says 4096"),
    ("delete", "is missing"),
    ("manifest", "manifest.json is damaged"),
])
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, capsys, damage, says):
    older = make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 10)  # 10 > 2 as numbers, though not as strings
    weights = newest / "learner" / "global_step1" / "mp_rank_00_model_states.pt"
    if damage == "flip":
        body = bytearray(weights.read_bytes())
        body[7] ^= 1
        weights.write_bytes(bytes(body))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    else:
        (newest / MANIFEST).write_text('{"files": {')
    assert latest_checkpoint(tmp_path) == older
    out = capsys.readouterr().out
    assert "checkpoint step_10 is damaged" in out and says in out and "using an older one" in out


def test_unfinished_and_foreign_folders_are_never_resumed_from(tmp_path):
    good = make_checkpoint(tmp_path, 3)
    # A kill during a checkpoint write leaves .step_N.tmp (no manifest yet); other names are not ours.
    tmp = tmp_path / "checkpoints" / ".step_4.tmp"
    (tmp / "learner").mkdir(parents=True)
    (tmp / "driver_state.json").write_text(json.dumps({"step": 4}))
    (tmp_path / "checkpoints" / "step_latest").mkdir()
    assert latest_checkpoint(tmp_path) == good


def test_a_checkpoint_from_before_manifests_is_judged_by_its_driver_state(tmp_path, capsys):
    older = make_checkpoint(tmp_path, 1, manifest=False)
    assert latest_checkpoint(tmp_path) == older
    newer = make_checkpoint(tmp_path, 2, manifest=False)
    (newer / "driver_state.json").write_text('{"step": ')
    assert latest_checkpoint(tmp_path) == older
    assert "driver_state.json is damaged" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_one_signal_asks_for_a_stop_and_a_second_stops_at_once(capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopSignals().install()
    try:
        assert not stop.requested
        # To this thread, which runs the handler before pthread_kill returns.
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        # The second signal put the previous handlers back: a third would not reach opsd.
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        stop.restore()
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after the step in progress" in err and "second SIGINT: stopping at once" in err
