"""launch/checkpoints.prune_checkpoints: train.keep_checkpoints keeps the newest N complete checkpoints."""

from __future__ import annotations

from opsd.launch.checkpoints import prune_checkpoints


def make(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "driver_state.json").write_text("{}")


def test_the_newest_are_kept_by_step_number_not_by_name(tmp_path):
    make(tmp_path, "step_2", "step_10", "step_4", "step_100", ".step_110.tmp")
    deleted = prune_checkpoints(tmp_path, 2, tmp_path / "step_100")
    assert sorted(d.name for d in deleted) == ["step_2", "step_4"]
    # step_10 < step_100: by number, not by the string order that would keep step_4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_110.tmp", "step_10", "step_100"]


def test_zero_keeps_all_and_the_newest_is_never_deleted(tmp_path):
    make(tmp_path, "step_1", "step_2", "step_3")
    assert prune_checkpoints(tmp_path, 0, tmp_path / "step_3") == []
    assert len(list(tmp_path.iterdir())) == 3
    # A newer folder than the one just written (left by an earlier run): the one just written stays.
    make(tmp_path, "step_9")
    prune_checkpoints(tmp_path, 1, tmp_path / "step_3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_9"]


def test_a_delete_interrupted_earlier_is_finished(tmp_path):
    make(tmp_path, ".step_1.deleting", "step_2", "step_3")
    prune_checkpoints(tmp_path, 1, tmp_path / "step_3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]
