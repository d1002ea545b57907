"""What the cluster path feeds the steps: a teacher in S3, held-out pairs beside a pairs.jsonl URI,
and the global batch kept when a training step spreads over several GPUs (real S3 server: SeaweedFS)."""

import json
from pathlib import Path

import pytest

from medcritical import storage
from medcritical.data.stage import PREPARE_DATA
from medcritical.distill.stage import DISTILL
from medcritical.orchestration.recipe import RecipeError, load_recipe
from medcritical.orchestration.runner import _local_recipe_files, keep_global_batch, local_inputs, run_stage
from medcritical.selfplay.stage import DPO, ROLLOUT
from medcritical.training.stage import SFT

PAIR = {
    "prompt": [{"role": "user", "content": "问"}],
    "chosen": [{"role": "assistant", "content": "对"}],
    "rejected": [{"role": "assistant", "content": "错"}],
}


def test_dpo_fetches_the_heldout_pairs_and_rollouts_beside_a_pairs_file_uri(s3_env, tmp_path, monkeypatch):
    """Given the pairs file itself, DPO still gets what lies beside it, because it declares it: the held-out pairs
    and the rollouts its pass@1 before DPO is read from (before, only the pairs file came down and the
    measurement was skipped without a word)."""
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    rollout = tmp_path / "rollout"
    rollout.mkdir()
    for name in ("pairs.jsonl", "pairs_heldout.jsonl", "rollouts.jsonl"):
        (rollout / name).write_text(json.dumps(PAIR | {"file": name}, ensure_ascii=False) + "\n", encoding="utf-8")
        storage.upload(rollout / name, f"s3://{s3_env}/run/round1-rollout/{name}")
    uri = f"s3://{s3_env}/run/round1-rollout/pairs.jsonl"  # what the DPO Job passes

    inputs = local_inputs(DPO, load_recipe(None, []), {"rollout": uri})
    assert inputs["rollout"].name == "pairs.jsonl"
    for name, file in (("heldout", "pairs_heldout.jsonl"), ("rollouts", "rollouts.jsonl")):
        assert inputs[name].is_file() and inputs[name].read_text(encoding="utf-8") == (rollout / file).read_text()


def test_missing_heldout_pairs_are_logged_not_fatal(s3_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    (tmp_path / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n")
    storage.upload(tmp_path / "pairs.jsonl", f"s3://{s3_env}/r/pairs.jsonl")
    uri = f"s3://{s3_env}/r/pairs.jsonl"
    inputs = local_inputs(DPO, load_recipe(None, []), {"rollout": uri})
    assert inputs["heldout"] is None and inputs["rollouts"] is None
    assert "no heldout input" in caplog.text and "no rollouts input" in caplog.text


def test_a_teacher_in_s3_is_downloaded_into_the_work_folder(s3_env, tiny_model, tmp_path, monkeypatch):
    """distill.teacher_model: s3://... was taken for a local folder ("not a Hugging Face model folder")."""
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    storage.upload(tiny_model, f"s3://{s3_env}/models/teacher")
    recipe = load_recipe(
        None,
        [
            "distill.backend=transformers",
            f"distill.teacher_model=s3://{s3_env}/models/teacher",
            "distill.limit=2",
            "distill.attempts=1",
            "distill.max_new_tokens=4",
            "distill.verify=false",
            "run.device=cpu",
            "data.train_size=4",
            "data.eval_size=2",
        ],
    )
    run_stage(PREPARE_DATA, recipe, str(tmp_path / "data"))
    result = run_stage(DISTILL, recipe, str(tmp_path / "distill"), data=str(tmp_path / "data"))
    # The downloaded teacher answered both questions (verify off: every reply is kept, right or wrong).
    assert result["questions"] == 2 and result["trace_attempts"] >= 2, result
    assert any((tmp_path / "work" / "in").rglob("config.json")), "the teacher was not downloaded into the work folder"


def test_several_gpus_keep_the_recipes_global_batch():
    recipe = load_recipe(
        None, ["sft.trainer.per_device_train_batch_size=1", "sft.trainer.gradient_accumulation_steps=16"]
    )
    eight = keep_global_batch(SFT, recipe, 8)
    assert eight.sft.settings["gradient_accumulation_steps"] == 2
    dpo = keep_global_batch(DPO, load_recipe(None, ["selfplay.dpo.trainer.gradient_accumulation_steps=16"]), 4)
    assert dpo.selfplay.dpo.settings["gradient_accumulation_steps"] == 4
    with pytest.raises(RecipeError, match="not a multiple of the 3 data-parallel ranks"):
        keep_global_batch(SFT, recipe, 3)
    assert keep_global_batch(SFT, recipe, 1) is recipe  # a single process trains the recipe as written


def test_the_report_reads_a_training_stage_statistics_without_downloading_its_model(s3_env, tmp_path, monkeypatch):
    from medcritical.orchestration.staging import read_stats
    from medcritical.training.stage import SFT

    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
    (sft / "sft_metrics.json").write_text(json.dumps({"steps": 4}))
    storage.upload(sft, f"s3://{s3_env}/run/sft")
    assert read_stats(f"s3://{s3_env}/run", SFT) == {"steps": 4}
    assert read_stats(f"s3://{s3_env}/run", SFT, filename="missing.json") is None
    assert not list((tmp_path / "work").rglob("model.safetensors")), "the model was downloaded to read a JSON"


def test_a_file_of_a_complete_s3_step_folder_comes_down_alone(s3_env, tmp_path, monkeypatch):
    """An input declared as one file of a stage's folder (the report's SFT statistics): only that file is fetched
    once the folder is complete, never the model beside it; a folder without its manifest is still refused."""
    from medcritical.orchestration.staging import input_file

    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    (sft / "sft_metrics.json").write_text('{"steps": 3}')
    storage.upload(sft, f"s3://{s3_env}/run/sft")
    path = input_file(f"s3://{s3_env}/run/sft", "sft_metrics.json")
    assert json.loads(path.read_text()) == {"steps": 3}
    assert not list((tmp_path / "work").rglob("model.safetensors"))
    # Objects without a manifest (an upload cut off): not read as a folder.
    storage.upload(sft / "sft_metrics.json", f"s3://{s3_env}/half/sft/sft_metrics.json")
    storage.upload(sft / "model" / "model.safetensors", f"s3://{s3_env}/half/sft/model/model.safetensors")
    with pytest.raises(storage.IncompleteUploadError):
        input_file(f"s3://{s3_env}/half/sft", "sft_metrics.json")


def test_the_teacher_corrector_gets_its_s3_teacher_and_the_self_corrector_does_not(
    s3_env, tiny_model, tmp_path, monkeypatch
):
    """The rollout read distill.teacher_model for the teacher corrector without declaring it: an s3:// teacher
    was taken for a local folder. Declared only for that corrector, so the self arm never downloads a teacher."""
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    teacher = f"s3://{s3_env}/models/teacher"
    storage.upload(tiny_model, teacher)
    settings = [f"distill.teacher_model={teacher}", "distill.backend=transformers"]
    self_arm = _local_recipe_files(ROLLOUT, load_recipe(None, settings))
    assert self_arm.distill.teacher_model == teacher
    assert not (tmp_path / "work" / "in").exists(), "the self arm downloaded the teacher"
    teacher_arm = _local_recipe_files(ROLLOUT, load_recipe(None, [*settings, "selfplay.corrector=teacher"]))
    assert (Path(teacher_arm.distill.teacher_model) / "config.json").is_file()
