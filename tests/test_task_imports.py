"""A pipeline task is a fresh Python process: one that neither trains nor generates must not pay for torch, TRL,
transformers, an OpenAI client or matplotlib (seconds per task under `medcritical run`, on every light step of every run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcritical.orchestration.recipe import RecipeError
from medcritical.platform.kfp_runtime import resolve_recipe_text, resolved_recipe_env

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "deepspeed", "datasets", "openai", "matplotlib")

# What a component does (components/<step>/component.py), then which heavy modules the process holds.
TASK = f"""
import json, sys
from medcritical.platform.kfp_runtime import run_component_step

class Metrics:
    def log_metric(self, key, value):
        pass

recipe, root = open(sys.argv[1]).read(), sys.argv[2]
run_component_step("prepare_data", recipe, root, "data", Metrics())
run_component_step("distill", recipe, root, "distill", Metrics(), data=root + "/data")
print(json.dumps(sorted(m for m in {HEAVY} if m in sys.modules)))
"""


def test_light_tasks_import_no_torch_or_trainer(tmp_path):
    demo = (REPO / "recipes" / "demo.yaml").read_text()
    configured = tmp_path / "recipe.yaml"  # the configure task's output, as every later task gets it
    configured.write_text(resolve_recipe_text(demo, 1, [], "", "", ""))
    run = subprocess.run(
        [sys.executable, "-c", TASK, configured, tmp_path / "run"], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "run" / "distill" / "sft.jsonl").is_file()


def test_a_configured_recipe_keeps_its_trainer_settings_unchecked_but_typed(tmp_path):
    """configure types and checks the trainer settings once; a task reading its output gets the same values."""
    from medcritical.orchestration.recipe import load_recipe_text

    demo = (REPO / "recipes" / "demo.yaml").read_text()
    configured = resolve_recipe_text(demo, 1, ["sft.trainer.learning_rate=3e-3"], "", "", "")
    task = load_recipe_text(configured, checked=True)
    assert task.sft.trainer["learning_rate"] == 0.003 and task == load_recipe_text(configured)


def _task_imports(func, executor_input: dict, env: dict, tmp_path: Path) -> set[str]:
    """Run the KFP component `func` as KFP's runners do (its source after KFP's header, in a fresh Python under
    `kfp.dsl.executor_main`); return the top-level packages the task imported (python -X importtime)."""
    from kfp import dsl

    spec = dsl.component(
        func, base_image="python:3.11", install_kfp_package=False
    ).component_spec.implementation.container
    module = tmp_path / "ephemeral_component.py"
    module.write_text(spec.command[-1])  # the component's source as the task gets it (after `sh -ec SCRIPT`)
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kfp.dsl.executor_main", "--component_module_path", module]
        + ["--function_to_execute", func.__name__, "--executor_input", json.dumps(executor_input)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env, "_KFP_RUNTIME": "true"},
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}


def test_the_configure_task_of_medcritical_run_imports_no_torch(tmp_path):
    """`medcritical run` checks the recipe in full once and hands the result to its configure task
    (RESOLVED_RECIPE_ENV): that task imports no torch, transformers or TRL, and resolves the same recipe."""
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.pipelines.medcritical_pipeline import configure
    from medcritical.platform.pipeline_runner import recipe_parameter

    parameter = recipe_parameter(load_recipe(REPO / "recipes" / "demo.yaml"))
    outputs = {name: {"outputFile": str(tmp_path / name)} for name in ("recipe", "gpu_node_selector")}
    executor_input = {
        "inputs": {
            "parameterValues": {
                "recipe": parameter,
                "rounds": 1,
                "overrides": [],
                "base_model": "",
                "teacher_base_url": "",
                "teacher_model": "",
                "teacher_on_gpu": False,
            }
        },
        "outputs": {"parameters": outputs, "outputFile": str(tmp_path / "executor_output.json")},
    }
    imported = _task_imports(configure, executor_input, resolved_recipe_env(parameter), tmp_path)
    assert sorted(imported & set(HEAVY)) == []
    resolved = json.loads((tmp_path / "executor_output.json").read_text())["parameterValues"]["recipe"]
    assert resolved == resolve_recipe_text(parameter, 1, [], "", "", "", False)


def test_a_recipe_checked_before_is_used_only_for_the_same_text_and_assignments(monkeypatch):
    """The configure task takes the recipe `medcritical run` checked only for exactly the text and assignments
    it checked; anything else (a cluster run, an override) is checked in full."""
    from medcritical.platform.kfp_runtime import resolved_before

    demo = (REPO / "recipes" / "demo.yaml").read_text()
    checked_in_full = resolve_recipe_text(demo, 1, [], "", "", "")
    monkeypatch.setenv(*resolved_recipe_env(demo).popitem())
    assert resolved_before(demo, []) == checked_in_full
    assert resolve_recipe_text(demo, 1, [], "", "", "") == checked_in_full
    with pytest.raises(RecipeError, match="compiled for 2 rounds"):  # configure's own checks still run
        resolve_recipe_text(demo, 2, [], "", "", "")
    assert resolved_before(demo, ["sft.trainer.learning_rate=1e-4"]) is None
    assert resolved_before(demo + "\n", []) is None
    checked = resolve_recipe_text(demo, 1, ["sft.trainer.learning_rate=1e-4"], "", "", "")
    assert "learning_rate: 0.0001" in checked
