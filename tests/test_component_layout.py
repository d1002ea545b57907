"""Each component's folder has what kubeflow/pipelines-components asks of one (component.py, README.md,
metadata.yaml, tests/), its metadata is valid by that repository's rules, and it compiles on its own."""

from __future__ import annotations

import datetime
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = sorted(p.parent.name for p in (REPO / "components").glob("*/component.py"))
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")  # exact versions: '>=2.5.0' and '3.6' are refused there too


def test_every_stage_has_a_component():
    assert COMPONENTS == ["distill", "dpo", "evaluate", "prepare_data", "report", "rollout", "sft"]


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_folder_has_a_readme_metadata_and_its_own_tests(name):
    folder = REPO / "components" / name
    assert (folder / "README.md").is_file()
    assert list((folder / "tests").glob("test_*.py")), f"components/{name}/tests has no test"
    metadata = yaml.safe_load((folder / "metadata.yaml").read_text(encoding="utf-8"))
    assert metadata["name"] == name
    assert metadata["stability"] in {"experimental", "alpha", "beta", "stable"}
    kubeflow = metadata["dependencies"]["kubeflow"]
    assert "Pipelines" in {d["name"] for d in kubeflow}
    for dependency in kubeflow:
        assert SEMVER.match(str(dependency["version"])), (name, dependency)
    verified = metadata["lastVerified"]
    assert isinstance(verified, datetime.datetime)
    assert verified <= datetime.datetime.now(datetime.UTC)
    assert (folder / metadata["links"]["documentation"]).is_file()


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_trainer_is_a_dependency_exactly_of_the_components_that_make_trainjobs(name):
    source = (REPO / "components" / name / "component.py").read_text(encoding="utf-8")
    metadata = yaml.safe_load((REPO / "components" / name / "metadata.yaml").read_text(encoding="utf-8"))
    names = {d["name"] for d in metadata["dependencies"]["kubeflow"]}
    assert ("Trainer" in names) == ("train_nodes" in source)


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_component_compiles_on_its_own_and_loads_back(name, tmp_path):
    module = importlib.import_module(f"medcritical.components.{name}.component")
    function = getattr(module, name)
    assert module.IMAGE in {"cpu", "train", "infer"}
    op = dsl.component(function, base_image=f"medcritical-{module.IMAGE}:test", install_kfp_package=False)
    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(op, str(path))
    loaded = components.load_component_from_file(str(path))
    declared = set(inspect.signature(function).parameters)
    compiled = set(loaded.component_spec.inputs or {}) | set(loaded.component_spec.outputs or {})
    assert compiled == declared
