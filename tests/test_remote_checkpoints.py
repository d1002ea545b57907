"""Checkpoints kept in S3 (training/remote_checkpoints.py), against the real SeaweedFS server: uploaded as saved,
rotated like the local ones, an incomplete or foreign one never resumed, and a training process killed after an
upload resumed on a fresh machine (no local work folder) from the uploaded checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medcritical.core.stage import OUTPUT_URI, Stage
from medcritical.io.fingerprint import ResumeMismatch
from medcritical.io.manifest import MANIFEST_NAME
from medcritical.orchestration.recipe import load_recipe_text
from medcritical.orchestration.runner import run_stage
from medcritical.selfplay.stage import DPO
from medcritical.storage import materialize
from medcritical.storage.folders import is_complete_folder, list_folders, read_small_object
from medcritical.training.common import checkpoint_step
from medcritical.training.remote_checkpoints import CheckpointUploader, RotateOnEveryNode, restore_checkpoint
from medcritical.training.stage import SFT
from tests.fixtures.sft import MAX_LENGTH, RESUME_TOLERANCE, run_as_two_nodes, short_questions, write_sft_dataset
from tests.test_faults import assert_ok, kill_when, medcritical, start

FINGERPRINT = {"settings": {"trainer": {"max_steps": 4}}, "seed": 0, "dataset": "abc", "model": "def"}


def fake_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """A checkpoint folder as the trainer leaves it: weights, optimizer, and trainer_state.json (written last)."""
    folder = checkpoints_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step]) * 1000)
    (folder / "optimizer.pt").write_bytes(bytes([step + 1]) * 2000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_the_runner_hands_training_stages_their_output_uri(s3_env, tmp_path, monkeypatch):
    """SFT and DPO ask for the URI their folder is published to (the OUTPUT_URI option); the runner fills it in,
    so any s3:// output keeps its checkpoints in S3, not only the run root's folders."""
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    assert OUTPUT_URI in SFT.options and OUTPUT_URI in DPO.options
    seen = {}

    def run(recipe, output_dir, **options):
        seen.update(options)
        return {}

    stage = Stage("probe", "probe", "run", run, {}, (), "stats.json", None, options=(OUTPUT_URI,))
    uri = f"s3://{s3_env}/anywhere/sft"
    run_stage(stage, load_recipe_text("{}"), uri)
    assert seen == {OUTPUT_URI: uri}


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


def test_the_best_checkpoint_comes_along_with_the_newest(s3_env, tmp_path):
    remote = f"s3://{s3_env}/run/round1-dpo/checkpoints"
    old_pod = tmp_path / "old-pod" / "checkpoints"
    uploader = CheckpointUploader(remote, FINGERPRINT)
    for step in (2, 4, 6):
        folder = fake_checkpoint(old_pod, step)
        best = {"global_step": step, "best_model_checkpoint": str(old_pod / "checkpoint-2")}
        (folder / "trainer_state.json").write_text(json.dumps(best))
        if step == 6:  # the trainer's rotation keeps the best one and the newest
            shutil.rmtree(old_pod / "checkpoint-4")
        uploader.upload(old_pod, step)
    assert list_folders(remote) == ["checkpoint-2", "checkpoint-6"]

    fresh = tmp_path / "new-pod" / "checkpoints"
    assert restore_checkpoint(remote, fresh, FINGERPRINT) == str(fresh / "checkpoint-6")
    assert (fresh / "checkpoint-2" / "model.safetensors").read_bytes() == bytes([2]) * 1000
    # The newest is written last: the trainer's rotation orders the checkpoints by mtime.
    assert (fresh / "checkpoint-6").stat().st_mtime >= (fresh / "checkpoint-2").stat().st_mtime


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


# -- a training process killed after an upload, resumed on a fresh machine --------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bundled):
    return write_sft_dataset(tmp_path_factory.mktemp("sft-data") / "traces.jsonl", short_questions(bundled, 24))


STEPS = 24


def training_args(command: str, data: list[str], model: Path, output: str, section: str, *settings: str) -> list[str]:
    """`medcritical sft|dpo` on the tiny model, full fine-tuning, STEPS steps, a checkpoint every 2 (the project's
    save_total_limit of 2 kept): enough that a kill after the first upload lands mid-run."""
    args = [command, *data, "--model", str(model), "--output", output]
    for setting in (
        "run.device=cpu",
        "run.threads=1",
        f"{section}.lora.enabled=false",
        f"{section}.trainer.max_length={MAX_LENGTH}",
        f"{section}.trainer.per_device_train_batch_size=2",
        f"{section}.trainer.max_steps={STEPS}",
        f"{section}.trainer.save_steps=2",
        f"{section}.trainer.logging_steps=1",
        *settings,
    ):
        args += ["--set", setting]
    return args


def sft_args(dataset: Path, model: Path, output: str, *settings: str) -> list[str]:
    sft = ("sft.trainer.learning_rate=3e-3", "sft.trainer.warmup_steps=0")
    return training_args("sft", ["--dataset", str(dataset)], model, output, "sft", *sft, *settings)


def kill_after_an_upload_then_resume(tmp_path, bucket, client, args, output: str, metrics_file: str) -> dict:
    """Start the training step `args` into the S3 folder `output`, SIGKILL it once a checkpoint is uploaded, delete its
    local work folder (a fresh pod), rerun it: it resumes from the newest uploaded checkpoint. Returns its metrics."""
    remote = f"{output}/checkpoints"
    prefix = output.removeprefix(f"s3://{bucket}/")

    def uploaded(step: int) -> bool:
        key = f"{prefix}/checkpoints/checkpoint-{step}/{MANIFEST_NAME}"
        return any(o.object_name == key for o in client.list_objects(bucket, prefix=key))

    proc = start(tmp_path, *args)
    kill_when(proc, lambda: uploaded(2), "checkpoint-2 uploaded to S3")
    killed_at = max(checkpoint_step(n) for n in list_folders(remote) if uploaded(checkpoint_step(n)))
    assert killed_at < STEPS and read_small_object(f"{output}/{MANIFEST_NAME}") is None  # killed mid-run
    shutil.rmtree(tmp_path / "work")  # a fresh pod: the local work folder and its checkpoints are gone

    rerun = medcritical(tmp_path, *args)
    assert_ok(rerun)
    assert f"downloaded {remote}/checkpoint-{killed_at}" in rerun.stderr
    metrics = json.loads(read_small_object(f"{output}/{metrics_file}"))
    assert metrics["resumed_from"] == f"checkpoint-{killed_at}"
    assert metrics["steps"] == STEPS and metrics["steps_this_session"] == STEPS - killed_at
    return metrics


def assert_ends_like_an_uninterrupted_run(tmp_path, metrics: dict, output: str, uninterrupted: Path, metrics_file: str):
    """The same losses after the resume as an uninterrupted run into `uninterrupted`, and the same weights."""
    killed_at = int(metrics["resumed_from"].split("-")[1])
    expected = json.loads((uninterrupted / metrics_file).read_text())["loss_curve"]
    after = [p for p in metrics["loss_curve"] if p["step"] > killed_at]
    assert [p["step"] for p in after] == [p["step"] for p in expected if p["step"] > killed_at]
    for got, want in zip(after, [p for p in expected if p["step"] > killed_at]):
        assert got["loss"] == pytest.approx(want["loss"], abs=RESUME_TOLERANCE)
    resumed = load_file(materialize(output, tmp_path / "downloaded") / "model" / "model.safetensors")
    for name, weight in load_file(uninterrupted / "model" / "model.safetensors").items():
        torch.testing.assert_close(resumed[name], weight, atol=RESUME_TOLERANCE, rtol=0)


@pytest.mark.slow
def test_sft_killed_after_an_upload_resumes_from_s3_on_a_fresh_machine(
    tmp_path, s3_env, s3_server, tiny_model, dataset
):
    run_root = f"s3://{s3_env}/runs/preempted"
    output = f"{run_root}/sft"
    # Kept after the model is published, to check their rotation (the DPO test below checks their removal).
    args = sft_args(dataset, tiny_model, output, f"run.output_dir={run_root}", "sft.keep_checkpoints=true")
    metrics = kill_after_an_upload_then_resume(tmp_path, s3_env, s3_server.client(), args, output, "sft_metrics.json")
    assert list_folders(f"{output}/checkpoints") == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]  # rotated

    local = tmp_path / "uninterrupted"
    assert_ok(medcritical(tmp_path, *sft_args(dataset, tiny_model, str(local))))
    assert_ends_like_an_uninterrupted_run(tmp_path, metrics, output, local, "sft_metrics.json")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, bundled):
    """Preference pairs on short questions: the gold letter chosen, another letter rejected."""
    rows = []
    for question in short_questions(bundled, 24):
        prompt = [{"role": "user", "content": f"{question.question}\n" + "\n".join(question.options.values())}]
        wrong = next(letter for letter in question.options if letter not in question.answer)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"答案：{question.answer}"}],
                "rejected": [{"role": "assistant", "content": f"答案：{wrong}"}],
            }
        )
    path = tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def dpo_args(pairs: Path, model: Path, output: str, *settings: str) -> list[str]:
    dpo = ("selfplay.dpo.trainer.learning_rate=1e-3",)
    return training_args("dpo", ["--pairs", str(pairs)], model, output, "selfplay.dpo", *dpo, *settings)


@pytest.mark.slow
def test_dpo_killed_after_an_upload_resumes_from_s3_on_a_fresh_machine(tmp_path, s3_env, s3_server, tiny_model, pairs):
    """DPO as SFT above. The reference model is the starting model in both runs, so the resumed run ends where an
    uninterrupted one does."""
    run_root = f"s3://{s3_env}/runs/preempted-dpo"
    output = f"{run_root}/dpo"
    args = dpo_args(pairs, tiny_model, output, f"run.output_dir={run_root}")
    client = s3_server.client()
    metrics = kill_after_an_upload_then_resume(tmp_path, s3_env, client, args, output, "dpo_metrics.json")
    # The model is published: the checkpoints mirrored for a new pod are removed (selfplay.dpo.keep_checkpoints).
    assert list(client.list_objects(s3_env, prefix="runs/preempted-dpo/dpo/checkpoints/", recursive=True)) == []
    assert read_small_object(f"{output}/model/config.json") is not None

    local = tmp_path / "uninterrupted"
    assert_ok(medcritical(tmp_path, *dpo_args(pairs, tiny_model, str(local))))
    assert_ends_like_an_uninterrupted_run(tmp_path, metrics, output, local, "dpo_metrics.json")


def node_disk(folder: Path, steps, *, shared_with_rank0: bool) -> Path:
    """The checkpoints folder as a node other than rank 0's sees it after each save: its ranks' ZeRO partitions,
    and trainer_state.json only where rank 0 writes on the same (shared) disk."""
    for step in steps:
        checkpoint = folder / f"checkpoint-{step}" / f"global_step{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"partition")
        if shared_with_rank0:
            (checkpoint.parent / "trainer_state.json").write_text("{}")
        time.sleep(0.01)
    return folder


@pytest.mark.parametrize("shared", [False, True], ids=["node-local disk", "disk shared with rank 0"])
def test_the_other_nodes_rotate_their_own_disks(tmp_path, shared):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    folder = node_disk(tmp_path / "checkpoints", (2, 4, 6), shared_with_rank0=shared)
    args = TrainingArguments(output_dir=str(folder), save_total_limit=2, use_cpu=True, report_to="none")
    # The first process of the second node: not global rank 0, rank 0 of its node.
    state = TrainerState(global_step=6, is_world_process_zero=False, is_local_process_zero=True)
    RotateOnEveryNode().on_save(args, state, TrainerControl())
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == (["checkpoint-2", "checkpoint-4", "checkpoint-6"] if shared else ["checkpoint-4", "checkpoint-6"])


@pytest.mark.slow
def test_two_nodes_with_their_own_disks_upload_from_rank0_and_rotate_both_disks(tmp_path, s3_env, tiny_model, dataset):
    """Two torchrun "nodes" (one process each, plain DDP over gloo), each with its own work folder, as in a
    two-node TrainJob with emptyDir work folders; the output under the run root on S3, a checkpoint every step."""
    run_root = f"s3://{s3_env}/runs/two-nodes"
    args = sft_args(dataset, tiny_model, f"{run_root}/sft", f"run.output_dir={run_root}")
    args += ["--set", "sft.trainer.max_steps=3", "--set", "sft.trainer.save_steps=1"]
    args += ["--set", "sft.keep_checkpoints=true"]  # to see them after the run: removed once published otherwise
    args += ["--set", "sft.trainer.gradient_accumulation_steps=2"]  # the runner divides it by the 2 ranks
    nodes = run_as_two_nodes(tmp_path, args, timeout_s=300)
    logs = [log for _, log in nodes]
    assert [code for code, _ in nodes] == [0, 0], "\n---\n".join(log[-3000:] for log in logs)

    assert list_folders(f"{run_root}/sft/checkpoints") == ["checkpoint-2", "checkpoint-3"]
    assert "checkpoint-3 uploaded" in logs[0] and "uploaded" not in logs[1]  # rank 0 uploads, alone
    for rank in (0, 1):  # the second node's disk is rotated too (it holds its rank's RNG state of each save)
        [scratch] = (tmp_path / f"node{rank}" / "work" / "out").iterdir()
        kept = sorted(p.name for p in (scratch / "checkpoints").glob("checkpoint-*"))
        assert kept == ["checkpoint-2", "checkpoint-3"], (rank, kept)
    assert "this node's disk: removed checkpoint-1" in logs[1]


def kill_with_its_ranks(launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun and its rank processes at once, as the loss of the node would. torchrun starts each rank
    in a session of its own: killing the launcher's process group leaves them running."""
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_pid(p) == launcher.pid]
    for pid in (launcher.pid, *ranks):
        with contextlib.suppress(ProcessLookupError):  # ended by itself meanwhile
            os.kill(pid, signal.SIGKILL)
    for pid in ranks:  # gone before the test goes on (they hold the work folder's files open)
        while Path(f"/proc/{pid}").exists() and _parent_pid(Path(f"/proc/{pid}")) is not None:
            time.sleep(0.01)


def _parent_pid(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]) if fields[0] != "Z" else None  # a zombie has died already


@pytest.mark.slow
def test_zero2_on_two_processes_killed_after_an_upload_resumes_from_s3(
    tmp_path, s3_env, s3_server, tiny_model, dataset
):
    """One node, two ranks, DeepSpeed ZeRO-2: each rank's optimizer partition is in the checkpoint rank 0
    uploads (the ranks write them before it reads the folder), and the rerun on a fresh disk loads them."""
    run_root = f"s3://{s3_env}/runs/zero2"
    args = sft_args(dataset, tiny_model, f"{run_root}/sft", f"run.output_dir={run_root}", "sft.deepspeed=zero2")
    args += ["--set", "sft.trainer.gradient_accumulation_steps=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "medcritical.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCRITICAL_WORKDIR": str(tmp_path / "work")}
    manifest = f"runs/zero2/sft/checkpoints/checkpoint-2/{MANIFEST_NAME}"
    client = s3_server.client()

    def run(*, kill_after_upload: bool) -> str:
        with open(tmp_path / "run.log", "w+") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 600
            while process.poll() is None and time.monotonic() < deadline:
                if kill_after_upload and any(True for _ in client.list_objects(s3_env, prefix=manifest)):
                    kill_with_its_ranks(process)
                    break
                time.sleep(0.05)
            if process.poll() is None and not kill_after_upload:
                kill_with_its_ranks(process)
            process.wait(timeout=60)
            log.seek(0)
            output = log.read()
        if kill_after_upload:
            assert process.returncode == -signal.SIGKILL, output[-3000:]  # killed mid-run, not finished
        else:
            assert process.returncode == 0, output[-3000:]
        return output

    run(kill_after_upload=True)
    remote = f"{run_root}/sft/checkpoints"
    killed_at = max(checkpoint_step(n) for n in list_folders(remote) if is_complete_folder(f"{remote}/{n}"))
    prefix = f"runs/zero2/sft/checkpoints/checkpoint-{killed_at}/"
    uploaded = [o.object_name for o in client.list_objects(s3_env, prefix=prefix, recursive=True)]
    for rank in (0, 1):  # each rank's optimizer partition went up with rank 0's upload
        assert any(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in name for name in uploaded), uploaded
    shutil.rmtree(tmp_path / "work")  # a fresh pod

    log = run(kill_after_upload=False)
    assert f"downloaded {remote}/checkpoint-{killed_at}" in log
    metrics = json.loads(read_small_object(f"{run_root}/sft/sft_metrics.json"))
    assert metrics["zero_stage"] == 2 and metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert metrics["resumed_from"] == f"checkpoint-{killed_at}"  # DeepSpeed loaded both ranks' partitions
    assert metrics["steps_this_session"] == STEPS - killed_at
