"""The benchmarks' bookkeeping: the "not run" record of a GPU benchmark on a CPU machine, the ratios of the key
table, the linear fit of the scaling benchmark, and BENCHMARKS.md rendered from result files. No timings here:
the benchmarks themselves are run by hand (`python -m benchmarks.<name>`)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import generation_gpu, report, training_gpu
from benchmarks.common import new_result, summary_row, to_markdown, today
from benchmarks.scaling import fit_linear
from benchmarks.storage import make_checkpoint

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken when no GPU is visible")


@no_gpu
@pytest.mark.parametrize("module", [training_gpu, generation_gpu])
def test_gpu_benchmark_without_gpu_records_not_run(module, tmp_path, capsys):
    output = tmp_path / "result.json"
    assert module.main(["--output", str(output)]) is None
    result = json.loads(output.read_text())
    assert result["status"] == "not_run"
    assert result["reason"] == f"no GPU machine was lent to this task (last attempted {today()})"
    assert result["planned"], "the rows it would have measured are listed"
    assert "--tiny" in capsys.readouterr().out  # the message says how to check the script without a GPU


@no_gpu
def test_not_run_keeps_earlier_real_figures(tmp_path):
    output = tmp_path / "result.json"
    output.write_text(json.dumps({"status": "ok", "summary": [], "benchmark": "training_gpu"}))
    training_gpu.main(["--output", str(output)])
    result = json.loads(output.read_text())
    assert result["status"] == "ok"
    assert result["later_attempts"][0]["date"] == today()


def test_summary_row_ratio_is_how_many_times_better_ours_is():
    faster = summary_row("s", "m", 200.0, 100.0, "MB/s", ours_label="a", baseline_label="b")
    shorter = summary_row("s", "m", 5.0, 20.0, "s", ours_label="a", baseline_label="b", higher_is_better=False)
    missing = summary_row("s", "m", None, 20.0, "s", ours_label="a", baseline_label="b")
    assert (faster["speedup"], shorter["speedup"], missing["speedup"]) == (2.0, 4.0, None)


def test_fit_linear_recovers_a_line():
    fit = fit_linear([1, 2, 4, 8], [0.5 + 0.25 * x for x in (1, 2, 4, 8)])
    assert fit == {"fixed_s": 0.5, "per_sample_s": 0.25, "r2": 1.0}
    assert fit_linear([3, 3], [1.0, 2.0]) is None


def test_checkpoint_folder_has_the_requested_size(tmp_path):
    files = make_checkpoint(tmp_path / "ckpt", 3 * 2**20)
    assert sum(f.stat().st_size for f in files) == 3 * 2**20
    assert any(f.name.endswith(".safetensors") for f in files)


def test_benchmarks_md_shows_ours_beside_baseline_and_not_run_rows(tmp_path):
    storage = new_result("storage", "2. Storage")
    storage.pop("_t0")
    storage["wall_s"] = 1.0
    storage["summary"].append(
        summary_row("storage", "upload", 96.0, 86.0, "MB/s", ours_label="storage.upload", baseline_label="fput_object")
    )
    (tmp_path / "storage.json").write_text(json.dumps(storage))
    training_gpu.main(["--output", str(tmp_path / "training_gpu.json")])

    text = report.render(report.load_results(tmp_path))
    assert "| 96.0 MB/s (storage.upload) | 86.0 MB/s (fput_object) | 1.12x |" in text
    if not torch.cuda.is_available():
        assert f"not run: no GPU machine was lent to this task (last attempted {today()})" in text
    assert "no result yet" in text  # benchmarks without a result file are listed, not dropped
    assert to_markdown(storage) in text


def test_pipeline_tasks_are_read_from_the_run_output():
    from benchmarks.pipeline_e2e import parse_tasks

    output = [
        "[    0 s] configure ...\n",
        "[    0 s] configure: success\n",
        "[    2 s] \x1b[96mevaluate-2\x1b[0m ...\n",
        "WARNING: something\n",
        "         step eval-sft -> /tmp/run/eval-sft\n",
        "[    9 s] evaluate-2: success\n",
        "INFO - Executing task 'rollout'\n",
        "step round1-rollout -> /tmp/run/round1-rollout\n",
        "ERROR - Task 'rollout' finished with status FAILURE\n",
        "[   20 s] pipeline: failure\n",
    ]
    tasks = parse_tasks([(float(i), line) for i, line in enumerate(output)])
    assert [(t["task"], t["step"], t["status"], t["s"]) for t in tasks] == [
        ("configure", "configure", "success", 1.0),
        ("evaluate-2", "eval-sft", "success", 3.0),
        ("rollout", "round1-rollout", "failure", 2.0),
    ]


def test_roofline_counts_the_kv_cache_of_a_7b_shaped_model():
    from transformers import Qwen2Config

    from benchmarks.generation_gpu import kv_cache_bytes_per_token
    from benchmarks.models import QWEN25_7B

    assert kv_cache_bytes_per_token(Qwen2Config(**QWEN25_7B)) == 57_344  # 2 x 28 layers x 4 KV heads x 128 x 2 bytes
