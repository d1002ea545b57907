"""Checkpoints kept in S3 (training/remote_checkpoints.py), against the real SeaweedFS server: uploaded as saved,
rotated like the local ones, an incomplete or foreign one never resumed, and a training process killed after an
upload resumed on a fresh machine (no local work folder) from the uploaded checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from medcritical.io.fingerprint import ResumeMismatch
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.recipe import load_recipe_text
from medcritical.staging import local_output_path
from medcritical.storage.folders import list_folders, read_small_object
from medcritical.training.remote_checkpoints import CheckpointUploader, restore_checkpoint
from medcritical.training.stage import published_uri, scratch_name

FINGERPRINT = {"settings": {"trainer": {"max_steps": 4}}, "seed": 0, "dataset": "abc", "model": "def"}


def fake_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """A checkpoint folder as the trainer leaves it: weights, optimizer, and trainer_state.json (written last)."""
    folder = checkpoints_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step]) * 1000)
    (folder / "optimizer.pt").write_bytes(bytes([step + 1]) * 2000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_the_run_roots_s3_output_is_recognised_by_its_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    recipe = load_recipe_text("run: {output_dir: 's3://bucket/runs/a'}\n")
    uri = "s3://bucket/runs/a/sft"
    assert scratch_name(uri) == local_output_path(uri).name  # the runner's naming, which the stage relies on
    assert published_uri(recipe, local_output_path(uri), "sft") == uri
    assert published_uri(recipe, local_output_path("s3://bucket/elsewhere/sft"), "sft") is None
    local = load_recipe_text(f"run: {{output_dir: '{tmp_path / 'runs'}'}}\n")
    assert published_uri(local, tmp_path / "runs" / "sft", "sft") is None  # a local output keeps them there


def test_uploads_keep_only_the_checkpoints_the_trainer_keeps(s3_env, tmp_path):
    remote = f"s3://{s3_env}/run/sft/checkpoints"
    local = tmp_path / "checkpoints"
    uploader = CheckpointUploader(remote, FINGERPRINT)
    for step in (2, 4, 6):
        fake_checkpoint(local, step)
        if step == 6:  # the trainer's rotation (save_total_limit 2) deleted the oldest before on_save
            shutil.rmtree(local / "checkpoint-2")
        uploader.upload(local, step)
    assert list_folders(remote) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads(read_small_object(f"{remote}/fingerprint.json")) == FINGERPRINT
    assert read_small_object(f"{remote}/checkpoint-6/{MANIFEST_NAME}") is not None  # written last: complete


def test_a_new_machine_resumes_the_newest_complete_checkpoint_not_an_incomplete_one(
    s3_env, s3_server, tmp_path, caplog
):
    remote = f"s3://{s3_env}/run/sft/checkpoints"
    uploader = CheckpointUploader(remote, FINGERPRINT)
    for step in (2, 4):
        fake_checkpoint(tmp_path / "old-pod", step)
        uploader.upload(tmp_path / "old-pod", step)
    # The pod was killed while uploading checkpoint-4: its files are there, its manifest (written last) is not.
    s3_server.client().remove_object(s3_env, f"run/sft/checkpoints/checkpoint-4/{MANIFEST_NAME}")
    # And a new pod killed while downloading left a partial folder holding trainer_state.json: not resumable.
    fresh = tmp_path / "new-pod" / "checkpoints"
    (fresh / ".downloading-checkpoint-2").mkdir(parents=True)
    (fresh / ".downloading-checkpoint-2" / "trainer_state.json").write_text("{}")

    with caplog.at_level(logging.WARNING):
        restored = restore_checkpoint(remote, fresh, FINGERPRINT)
    assert restored == str(fresh / "checkpoint-2")
    assert "checkpoint-4 is incomplete" in caplog.text
    uploaded = tmp_path / "old-pod" / "checkpoint-2"
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (fresh / "checkpoint-2" / name).read_bytes() == (uploaded / name).read_bytes()
    assert sorted(p.name for p in fresh.iterdir() if not p.name.startswith(".download.")) == ["checkpoint-2"]
    # The machine's own complete checkpoint comes first: nothing more is downloaded.
    assert restore_checkpoint(remote, fresh, FINGERPRINT) == str(fresh / "checkpoint-2")


def test_remote_checkpoints_of_other_inputs_are_refused_or_discarded_on_restart(s3_env, tmp_path):
    remote = f"s3://{s3_env}/run/sft/checkpoints"
    fake_checkpoint(tmp_path / "old-pod", 2)
    CheckpointUploader(remote, FINGERPRINT).upload(tmp_path / "old-pod", 2)
    other = FINGERPRINT | {"settings": {"trainer": {"max_steps": 8}}}

    with pytest.raises(ResumeMismatch, match=r"settings\.trainer\.max_steps: 4 -> 8.*--restart"):
        restore_checkpoint(remote, tmp_path / "new-pod", other)
    assert not (tmp_path / "new-pod" / "checkpoint-2").exists()

    assert restore_checkpoint(remote, tmp_path / "new-pod", other, restart=True) is None
    assert list_folders(remote) == []  # discarded: the restarted run's checkpoints replace them
