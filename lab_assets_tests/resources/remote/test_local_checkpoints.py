"""Local training checkpoints: a killed local adapter resumes, redoing at most one interval."""

import pytest

from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model
from lab_assets.ml.train import TrainSpec, train_adapter
from resources.remote.checkpointing import (
    discard_local_checkpoints,
    local_checkpoint_root,
    local_checkpointing,
)


class _Killed(Exception):
    pass


def test_a_killed_local_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("LAB_CHECKPOINT_EVERY", "2")
    base = tmp_path / "base"
    build_tiny_model(base, TinyModelSpec(pretrain_steps=5, corpus_size=200))
    spec = TrainSpec(method="lora_sft", task="reverse", seed=2, steps=6)
    kwargs = local_checkpointing("tiny|sft-reverse-r8-s2", f"{spec}|base", spec.steps)
    assert kwargs["checkpoint_every"] == 2
    assert kwargs["checkpoint_dir"].parent == local_checkpoint_root() == tmp_path / "checkpoints"

    def killed_at_step_5(msg: str) -> None:
        if "step 5/" in msg:
            raise _Killed(msg)

    with pytest.raises(_Killed):
        train_adapter(base, tmp_path / "first", spec, killed_at_step_5, **kwargs)
    lines: list[str] = []
    resumed = train_adapter(base, tmp_path / "again", spec, lines.append, **kwargs)
    assert any("resuming from" in m and m.endswith("checkpoint-4") for m in lines)
    redone = [m for m in lines if " step " in m and "loss" in m]
    assert len(redone) == 2  # steps 5 and 6: at most one interval (2 steps) redone
    assert resumed.steps == 6
    discard_local_checkpoints(kwargs)
    assert not kwargs["checkpoint_dir"].exists()


def test_checkpoint_dirs_are_per_partition_and_spec_and_skipped_for_short_runs(monkeypatch):
    monkeypatch.setenv("LAB_CHECKPOINT_EVERY", "100")
    one = local_checkpointing("m|r", "spec-a", 500)["checkpoint_dir"]
    assert local_checkpointing("m|r", "spec-b", 500)["checkpoint_dir"] != one
    assert local_checkpointing("m|other", "spec-a", 500)["checkpoint_dir"] != one
    assert local_checkpointing("m|r", "spec-a", 500)["checkpoint_dir"] == one
    assert local_checkpointing("m|r", "spec-a", 100) == {}  # nothing worth saving
    discard_local_checkpoints({"checkpoint_dir": "/etc"})  # not ours: left alone
