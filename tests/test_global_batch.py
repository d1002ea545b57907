"""Every path trains with the recipe's global batch (per_device_train_batch_size x gradient_accumulation_steps,
as on one GPU): one process, torchrun inside a pod (the sft component on a pod of several GPUs), and a
Kubeflow Trainer TrainJob's nodes (the command the pipeline's TrainJob runs, here two "nodes" of one process
on this machine, rendezvousing through the PET_* variables the runtime sets). The runner divides the
accumulation by WORLD_SIZE (runner.keep_global_batch); nothing else does.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medcritical.orchestration.recipe import dump_recipe, load_recipe_text
from medcritical.orchestration.runner import run_stage
from medcritical.training.stage import SFT
from tests.fixtures.sft import MAX_LENGTH, short_questions, write_sft_dataset

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400
# Global batch 4: 2 per device x 2 accumulation steps on one GPU; on 2 ranks 2 x 1 x 2.
RECIPE = (
    "run: {threads: 1}\n"
    f"sft: {{lora: {{enabled: false}}, deepspeed: zero2, trainer: {{max_length: {MAX_LENGTH}, max_steps: 2, "
    "per_device_train_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, warmup_steps: 0, "
    "learning_rate: 3.0e-3}}\n"
)


@pytest.fixture(scope="module")
def traces(tmp_path_factory, bundled):
    folder = tmp_path_factory.mktemp("distill")
    write_sft_dataset(folder / "sft.jsonl", short_questions(bundled, 16))
    return folder


def test_one_process_trains_the_recipes_batch(tmp_path, traces, tiny_model, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rendezvous = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")
    for name in rendezvous:
        monkeypatch.delenv(name, raising=False)
    metrics = run_stage(
        SFT, load_recipe_text(RECIPE), str(tmp_path / "sft"), distill=str(traces), model=str(tiny_model)
    )
    assert metrics["world_size"] == 1 and metrics["global_batch"] == 4
    # The world of one DeepSpeed needed is not left behind: a process started later (a KFP local step) that
    # inherited it would start DeepSpeed unasked, or rendezvous on a port this process still holds, and fail.
    assert not [name for name in rendezvous if name in os.environ]


def test_torchrun_in_a_pod_trains_the_recipes_batch(tmp_path, traces, tiny_model, monkeypatch):
    from medcritical.platform.kfp_runtime import run_data_parallel

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    metrics = run_data_parallel(
        SFT, load_recipe_text(RECIPE), str(tmp_path / "sft"), {"distill": str(traces), "model": str(tiny_model)}, 2
    )
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_trainjobs_nodes_train_the_recipes_batch(tmp_path, traces, tiny_model, monkeypatch):
    """The TrainJob the pipeline creates for train_nodes=2: its trainer command and environment as built by
    trainjob.trainjob_manifest, run as its two nodes would run it (torchrun reading PET_*)."""
    from medcritical.platform.trainjob import RECIPE_FILE, trainjob_manifest

    recipe_yaml = dump_recipe(load_recipe_text(RECIPE))
    output = tmp_path / "sft"
    inputs = {"distill": str(traces), "model": str(tiny_model)}
    trainer = trainjob_manifest(
        "sft", recipe_yaml, str(output), inputs, image="x", nodes=2, gpus_per_node=1, s3_secret="s3"
    )["spec"]["trainer"]
    recipe_file = tmp_path / "recipe.yaml"  # the pod's /tmp/recipe.yaml, here one per test
    script = (
        trainer["command"][2]
        .replace(RECIPE_FILE, str(recipe_file))
        .replace("exec torchrun", 'exec "$PYTHON" -m torch.distributed.run')
    )
    args = [a.replace(RECIPE_FILE, str(recipe_file)) for a in trainer["args"]]
    env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    port = _free_port()
    processes = []
    for node in range(2):
        node_env = {
            **os.environ,
            **env,
            "MEDCRITICAL_WORKDIR": str(tmp_path / f"work-{node}"),
            "PYTHON": sys.executable,  # the image's torchrun, from this venv
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        command = [*trainer["command"][:2], script, *trainer["command"][3:], *args]
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=node_env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        )
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the TrainJob's nodes did not finish")
        assert process.returncode == 0, stderr[-3000:]
    metrics = json.loads((output / "sft_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 4
