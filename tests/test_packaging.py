"""pyproject.toml lists packages by hand (several source roots); every package folder must be in it, and a built
wheel must carry what the code reads beside itself (the recipes, the DeepSpeed configs, the benchmark figures)."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folders shipped as data inside the package (no Python in them): medcritical/core/shipped.py finds them.
DATA_PACKAGES = {"medcritical.recipes", "medcritical.recipes.deepspeed", "medcritical.benchmark_results"}


def package_folders() -> set[str]:
    found = set()
    roots = {
        "src/medcritical": "medcritical",
        "components": "medcritical.components",
        "pipelines": "medcritical.pipelines",
    }
    for root, name in roots.items():
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root)
            found.add(".".join([name, *relative.parts]))
    return found | DATA_PACKAGES


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert package_folders() == listed


def test_readme_test_command_is_what_ci_runs():
    ci_command = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command in (REPO / "README.md").read_text()


def test_a_wheel_plans_from_what_it_carries(tmp_path):
    """`medcritical plan` installed from a wheel, run away from any checkout, finds the DeepSpeed configs and the
    measured step times: before, it read them from the source tree and an installed package had neither."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, REPO], check=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", site, *wheels.glob("*.whl")], check=True)
    shipped = site / "medcritical" / "recipes"
    check = (
        "from medcritical.platform import plan; from medcritical.core import shipped; "
        f"assert shipped.recipes_dir() == __import__('pathlib').Path({str(shipped)!r}), shipped.recipes_dir(); "
        "print(plan.zero_settings('/opt/medcritical/recipes/deepspeed/zero3_offload.json'))"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(3, True)"
    plan = [sys.executable, "-m", "medcritical.cli", "plan", "--recipe", shipped / "demo.yaml", "--no-manifests"]
    run = subprocess.run([*plan, "--no-pipeline"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "time: measured for this recipe (pipeline_e2e.json" in run.stdout
