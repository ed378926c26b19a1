"""Checkpoints of ``lowcost finetune`` are published atomically: a save that dies half-way leaves the last
good checkpoint as the newest, and its leftovers are never mistaken for a checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lowcost.cli._rundir import checkpoints, latest_checkpoint, publish_dir, save_checkpoint, write_file


def _save(out, step, fail=False):
    def adapter(directory):
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"weights")
        if fail:
            raise RuntimeError("crash in the middle of a save")
    return save_checkpoint(out, step, adapter, {"optimizer": {"lr": torch.tensor(0.5)}, "rng": torch.arange(3)},
                           {"step": step})


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 2)
    with pytest.raises(RuntimeError, match="crash"):
        _save(tmp_path, 4, fail=True)
    assert [step for step, _ in checkpoints(tmp_path)] == [2]
    path, trainer_state, state = latest_checkpoint(tmp_path)
    assert state == {"step": 2} and torch.equal(trainer_state["rng"], torch.arange(3))


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    _save(tmp_path, 2)
    stray = tmp_path / "checkpoints" / ".tmp-step-000004-abc"      # what SIGKILL mid-save leaves
    stray.mkdir()
    (stray / "state.json").write_text("{")
    assert [step for step, _ in checkpoints(tmp_path)] == [2]
    _save(tmp_path, 4)
    _save(tmp_path, 6)
    assert [step for step, _ in checkpoints(tmp_path)] == [4, 6]         # the two newest are kept
    assert not stray.exists()


def test_trainer_state_is_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = _save(tmp_path, 2)
    torch.save({"payload": Evil()}, path / "trainer_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        latest_checkpoint(tmp_path)


def test_publish_dir_replaces_and_write_file_is_whole(tmp_path):
    final = tmp_path / "adapter"
    publish_dir(final, lambda d: (d / "a.txt").write_text("one"))
    publish_dir(final, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]      # no temporary left behind
    write_file(tmp_path / "m.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 1}
    assert oct((tmp_path / "m.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
