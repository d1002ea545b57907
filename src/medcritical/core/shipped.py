"""Files the package ships beside its code: the recipes (with the DeepSpeed configs) and the benchmark figures.

An installed wheel carries them inside the package (`medcritical/recipes/`, `medcritical/benchmark_results/`,
mapped in pyproject.toml); a source checkout (an editable install) has them at the top of the repository.
`medcritical plan` reads both, so it gives the same answer from a wheel, an image or a clone.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # medcritical/ (this file is in medcritical/core/)
REPOSITORY = PACKAGE.parents[1]  # src/medcritical -> the checkout's root


def _shipped(in_package: str, in_repository: str) -> Path:
    installed = PACKAGE / in_package
    return installed if installed.is_dir() else REPOSITORY / in_repository


def recipes_dir() -> Path:
    """The shipped recipes (recipes/*.yaml)."""
    return _shipped("recipes", "recipes")


def deepspeed_dir() -> Path:
    """The DeepSpeed configs a recipe names by their bare name (recipes/deepspeed/*.json)."""
    return recipes_dir() / "deepspeed"


def benchmark_results_dir() -> Path:
    """The committed benchmark figures (benchmarks/results/*.json) the plan reads its time estimates from."""
    return _shipped("benchmark_results", "benchmarks/results")
