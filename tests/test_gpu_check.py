"""The prepared GPU check (benchmarks/gpu_check.sh) in its CPU smoke mode: the same install and measure
steps as on a GPU machine, on the tiny model, writing results that `benchmarks.report` renders."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report
from benchmarks.common import REPO


@pytest.mark.slow
def test_gpu_check_smoke_mode_writes_figures_the_report_reads(tmp_path):
    results = tmp_path / "results"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        RESULTS_DIR=str(results),
        WORK_DIR=str(tmp_path / "work"),
        SITE=str(tmp_path / "site"),
        OUT=str(tmp_path / "out"),
        OMP_NUM_THREADS="1",
    )
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "smoke"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imports ok" in run.stdout
    training = json.loads((results / "training_gpu-tiny.json").read_text())
    generation = json.loads((results / "generation_gpu-tiny.json").read_text())
    assert {case: c["status"] for case, c in training["raw"]["cases"].items()} == {
        "sft-lora": "ok",
        "dpo-lora-precomputed": "ok",
    }  # the smoke run's two cases (the GPU run has four)
    assert generation["raw"]["cases"]["transformers"]["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "out" / "results").iterdir()) == [
        "generation_gpu-tiny.json",
        "training_gpu-tiny.json",
    ]  # what the device tool brings back
    text = report.render(report.load_results(results))
    assert "sft-lora: ok" in text and "transformers: ok" in text


def test_gpu_check_run_refuses_without_a_gpu():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
        timeout=120,
    )
    assert run.returncode == 2 and "no CUDA GPU visible" in run.stderr
