"""A pipeline task is a fresh Python process: one that neither trains nor generates must not pay for torch, TRL,
transformers, an OpenAI client or matplotlib (seconds per task under `medcritical run`, on every light step of every run)."""

import json
import subprocess
import sys
from pathlib import Path

from medcritical.kfp_runtime import resolve_recipe_text

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "deepspeed", "datasets", "openai", "matplotlib")

# What a component does (components/<step>/component.py), then which heavy modules the process holds.
TASK = f"""
import json, sys
from medcritical.kfp_runtime import run_component_step

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
    from medcritical.recipe import load_recipe_text

    demo = (REPO / "recipes" / "demo.yaml").read_text()
    configured = resolve_recipe_text(demo, 1, ["sft.trainer.learning_rate=3e-3"], "", "", "")
    task = load_recipe_text(configured, checked=True)
    assert task.sft.trainer["learning_rate"] == 0.003 and task == load_recipe_text(configured)
