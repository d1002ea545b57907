"""The components' tests call each component's function as a KFP task would (artifacts in, artifacts out),
on the tiny model, the bundled questions and a local run root, in data-flow order.

Each component runs once per session (a fixture here) and every folder's test asserts on its own run, so
no long step repeats: the whole chain, SFT and DPO included, takes under a minute on 2 cores.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
from kfp import dsl

from medcritical.components import distill, dpo, evaluate, prepare_data, rollout, sft
from medcritical.orchestration.recipe import dump_recipe, load_recipe_text

pytest_plugins = ["tests.fixtures.models"]

# Small enough to run in seconds, as tests/test_pipeline_run.py makes the local pipeline run small.
RECIPE = """
run: {{name: components, output_dir: "{root}", threads: 1}}
model: {{base: "{model}"}}
data: {{eval_size: 8, train_size: 16}}
generation: {{batch_size: 16, max_new_tokens: 24}}
distill: {{explanation_max_chars: 20}}
sft:
  lora: {{enabled: false}}
  trainer: {{learning_rate: 3.0e-3, max_steps: 4, per_device_train_batch_size: 8, max_length: 512, logging_steps: 1}}
selfplay:
  rounds: 1
  rollout: {{samples_per_question: 2, max_new_tokens: 24}}
  correction: {{attempts: 1}}
  dpo:
    lora: {{enabled: false}}
    trainer: {{max_steps: 2, per_device_train_batch_size: 2, max_length: 512, logging_steps: 1}}
"""


@dataclass
class Run:
    """Where the components write: the run root (their folders) and KFP's own artifact folder."""

    recipe: str
    root: Path

    def output(self, kind, name: str):
        """An output artifact as KFP hands it to a task: a path of its own under the pipeline root."""
        return kind(name=name, uri=str(self.root / "kfp" / name))

    def folder(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="session")
def run(tiny_model, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("component-run")
    recipe = load_recipe_text(RECIPE.format(root=root, model=tiny_model))
    return Run(dump_recipe(recipe), root)


@pytest.fixture(scope="session")
def prepared(run):
    metrics, data = dsl.Metrics(name="metrics"), run.output(dsl.Dataset, "data")
    prepare_data(run.recipe, str(run.root), "data", metrics, data)
    return data, metrics


@pytest.fixture(scope="session")
def distilled(run, prepared):
    metrics, traces = dsl.Metrics(name="metrics"), run.output(dsl.Dataset, "traces")
    distill(run.recipe, str(run.root), "distill", prepared[0], metrics, traces)
    return traces, metrics


@pytest.fixture(scope="session")
def fine_tuned(run, distilled):
    metrics, model = dsl.Metrics(name="metrics"), run.output(dsl.Model, "sft-model")
    sft(run.recipe, str(run.root), "sft", distilled[0], metrics, model)
    return model, metrics


@pytest.fixture(scope="session")
def played(run, prepared, fine_tuned):
    metrics, pairs = dsl.Metrics(name="metrics"), run.output(dsl.Dataset, "pairs")
    rollout(run.recipe, str(run.root), "round1-rollout", prepared[0], fine_tuned[0], metrics, pairs)
    return pairs, metrics


@pytest.fixture(scope="session")
def preferred(run, played, fine_tuned):
    metrics, model = dsl.Metrics(name="metrics"), run.output(dsl.Model, "dpo-model")
    dpo(run.recipe, str(run.root), "round1-dpo", played[0], fine_tuned[0], metrics, model)
    return model, metrics


@pytest.fixture(scope="session")
def evaluations(run, prepared, fine_tuned, preferred) -> dict:
    """The base, SFT and DPO models evaluated: label -> the evaluate component's Metrics artifact."""
    found = {}
    for label, name, model in (
        ("base", "eval-base", None),  # no model: the recipe's model.base, as the pipeline's eval-base
        ("sft", "eval-sft", fine_tuned[0]),
        ("dpo (round 1)", "eval-dpo-round1", preferred[0]),
    ):
        metrics = run.output(dsl.Metrics, f"{name}-metrics")
        evaluate(run.recipe, str(run.root), name, prepared[0], label, metrics, model=model)
        found[label] = metrics
    return found
