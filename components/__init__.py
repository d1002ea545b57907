"""Kubeflow Pipelines v2 components: one thin function per step over the medcritical library.

Installed as `medcritical.components` (see pyproject.toml's package-dir). Each function becomes a
`@dsl.component` in pipelines/medcritical_pipeline.py, with the image of its kind (IMAGE).
"""

from medcritical.components.distill import distill
from medcritical.components.dpo import dpo
from medcritical.components.evaluate import evaluate
from medcritical.components.prepare_data import prepare_data
from medcritical.components.report import report
from medcritical.components.rollout import rollout
from medcritical.components.sft import sft

__all__ = ["distill", "dpo", "evaluate", "prepare_data", "report", "rollout", "sft"]
