"""The same `medcritical sft` command under torchrun: two CPU processes (gloo) with DeepSpeed ZeRO-2 and ZeRO-3.

ZeRO-3 shards every weight across the ranks, so saving must gather them: the saved adapter and merged model
are checked for real, non-empty weights. (DeepSpeed builds a small shared-memory op for CPU the first time it
starts on a machine, ~1 min, cached in ~/.cache/torch_extensions.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medcritical.io.manifest import MANIFEST_NAME, verify_manifest
from medcritical.modeling.generation import TransformersGenerator
from tests.fixtures.sft import MAX_LENGTH, RESUME_TOLERANCE, run_as_two_nodes, short_questions, write_sft_dataset

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bundled):
    return write_sft_dataset(tmp_path_factory.mktemp("sft-data") / "traces.jsonl", short_questions(bundled, 32))


def torchrun_sft(dataset, model, output, *overrides):
    settings = [
        "run.threads=1",
        f"sft.trainer.max_length={MAX_LENGTH}",
        "sft.trainer.max_steps=6",
        "sft.trainer.per_device_train_batch_size=2",
        # The recipe gives the batch of one GPU (2 x 2); the runner divides the accumulation by the 2 ranks.
        "sft.trainer.gradient_accumulation_steps=2",
        "sft.trainer.logging_steps=1",
        "sft.trainer.warmup_steps=0",
        *overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medcritical.cli",
        "sft",
        "--dataset",
        str(dataset),
        "--model",
        str(model),
        "--output",
        str(output),
    ]
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Own session, so a hung run's rank processes are killed with the launcher, not left behind.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"torchrun sft did not finish in {TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return json.loads((output / "sft_metrics.json").read_text())


def _assert_trained_and_generates(output, metrics, stage):
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == stage and metrics["steps"] == 6
    assert metrics["loss_last"] < metrics["loss_first"]
    assert verify_manifest(output) == []
    generator = TransformersGenerator(output / "model", device="cpu", batch_size=2)
    [[completion]] = generator.generate([[{"role": "user", "content": "题目：发热的原因"}]], max_new_tokens=8)
    assert completion.num_tokens > 0


def test_zero2_full_fine_tuning_two_processes(tmp_path, dataset, tiny_model):
    output = tmp_path / "zero2"
    metrics = torchrun_sft(
        dataset, tiny_model, output, "sft.deepspeed=zero2", "sft.lora.enabled=false", "sft.trainer.learning_rate=3e-3"
    )
    _assert_trained_and_generates(output, metrics, stage=2)
    trained = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert trained.keys() == base.keys()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


ZERO3_LORA = (
    "sft.deepspeed=zero3",
    "sft.lora.enabled=true",
    "sft.trainer.learning_rate=1e-2",
    "sft.trainer.save_steps=3",
)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, dataset, tiny_model):
    output = tmp_path_factory.mktemp("sft-zero3")
    return output, torchrun_sft(dataset, tiny_model, output, *ZERO3_LORA)


def test_zero3_lora_merged_two_processes(zero3_run, tiny_model):
    output, metrics = zero3_run
    _assert_trained_and_generates(output, metrics, stage=3)
    assert metrics["merged"]
    # No empty adapter: every LoRA matrix has its full shape, and B (initialised to zero) holds trained values.
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in adapter.values())
    assert all(t.abs().max() > 0 for t in lora_b)
    # No missing weights: the merged model has every weight of the base, with the adapter folded in.
    merged = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert merged.keys() == base.keys()
    assert all(merged[k].shape == base[k].shape for k in base)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_zero3_run_resumes_from_its_deepspeed_checkpoint(tmp_path, zero3_run, dataset, tiny_model):
    finished, uninterrupted = zero3_run
    output = tmp_path / "zero3"
    shutil.copytree(finished, output)
    # Leave the folder as a run killed during step 4 would: checkpoint-3 only, no final outputs.
    for leftover in ("checkpoints/checkpoint-6", "model", "adapter"):
        shutil.rmtree(output / leftover)
    for leftover in ("sft_metrics.json", MANIFEST_NAME):
        (output / leftover).unlink()
    resumed = torchrun_sft(dataset, tiny_model, output, *ZERO3_LORA)
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["steps_this_session"] == 3
    after = [p["loss"] for p in resumed["loss_curve"] if p["step"] > 3]
    expected = [p["loss"] for p in uninterrupted["loss_curve"] if p["step"] > 3]
    assert len(after) == 3 and after == pytest.approx(expected, abs=RESUME_TOLERANCE)


def test_pipeline_component_relaunches_sft_under_torchrun(tmp_path, dataset, tiny_model, monkeypatch):
    """What the sft component does on a pod with several GPUs, here with 2 CPU processes: the step's CLI
    under torchrun, the recipe handed over as a file, the metrics read back for the KFP UI."""
    from medcritical.orchestration.recipe import load_recipe_text
    from medcritical.platform.kfp_runtime import run_data_parallel
    from medcritical.training.stage import SFT

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = load_recipe_text(
        f"run: {{threads: 1}}\n"
        f"sft: {{lora: {{enabled: false}}, deepspeed: zero2, trainer: {{max_length: {MAX_LENGTH}, max_steps: 4, "
        "per_device_train_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, warmup_steps: 0, "
        "learning_rate: 3.0e-3}}\n"  # global batch 4 on one GPU: 2 x 1 on each of the 2 ranks
    )
    output = tmp_path / "sft"
    metrics = run_data_parallel(SFT, recipe, str(output), {"distill": str(dataset), "model": str(tiny_model)}, gpus=2)
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["zero_stage"] == 2
    assert (output / "model" / "config.json").is_file() and verify_manifest(output) == []


def test_two_nodes_with_their_own_disks_train_one_model(tmp_path, dataset, s3_env):
    """What a two-node TrainJob does (k8s/jobs/sft-multinode): torchrun on each node (--nnodes 2), each node
    with its own work folder and model cache, the model "tiny" built on each, the output on S3. Found by
    running it so: the second node's tiny model had a tokenizer and no weights (transformers' save_pretrained
    writes only on global rank 0), and its rank failed to load it."""
    output = f"s3://{s3_env}/runs/two-nodes/sft"
    args = ["sft", "--dataset", str(dataset), "--model", "tiny", "--output", output]
    for setting in ("run.threads=1", "sft.lora.enabled=false", f"sft.trainer.max_length={MAX_LENGTH}"):
        args += ["--set", setting]
    args += ["--set", "sft.trainer.max_steps=2", "--set", "sft.trainer.per_device_train_batch_size=1"]
    args += ["--set", "sft.trainer.gradient_accumulation_steps=2"]  # the runner divides it by the 2 ranks
    nodes = run_as_two_nodes(tmp_path, args, timeout_s=TIMEOUT_S, own_cache=True)
    assert [code for code, _ in nodes] == [0, 0], "\n---\n".join(log[-3000:] for _, log in nodes)

    from medcritical.storage import materialize

    local = materialize(output, tmp_path / "downloaded")
    metrics = json.loads((local / "sft_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert verify_manifest(local) == [] and AutoModelForCausalLM.from_pretrained(local / "model") is not None
