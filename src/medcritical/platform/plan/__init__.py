"""Sizing preflight: what each step of a recipe needs (disk, host memory, GPU memory per rank), and
whether the Jobs and the compiled pipeline give it that much.

Nothing is loaded: the model's shape comes from its config.json (a local folder), a config.json
given with --model-config, the recipe's tiny-model settings, or a table of known shapes for the
paper's models (stored in S3, so not here). The formulas and their sources are in docs/sizing.md.

    shapes     the model's shape            needs      what each step needs
    manifests  what a pod or task gives     checks     one against the other, and the printed table
    measured   benchmarked step times       units      Kubernetes quantities, PlanError
"""

from medcritical.platform.plan.checks import Problem, Verdict, check, check_manifests, failing_steps, recipe_for, table
from medcritical.platform.plan.manifests import (
    Given,
    given_from_manifests,
    given_from_pipeline,
    given_from_pod,
    given_from_trainjob,
    node_pod_patches,
    pipeline_parameters,
)
from medcritical.platform.plan.measured import measured_seconds, training_time_note
from medcritical.platform.plan.needs import (
    PER_RANK_OVERHEAD,
    Need,
    cpu_need,
    generation_need,
    plan_steps,
    training_need,
    zero_settings,
)
from medcritical.platform.plan.shapes import KNOWN_SHAPES, ModelShape, model_shape, shape_from_config
from medcritical.platform.plan.units import GiB, PlanError, gib, quantity

__all__ = [
    "KNOWN_SHAPES",
    "PER_RANK_OVERHEAD",
    "GiB",
    "Given",
    "ModelShape",
    "Need",
    "PlanError",
    "Problem",
    "Verdict",
    "check",
    "check_manifests",
    "cpu_need",
    "failing_steps",
    "generation_need",
    "gib",
    "given_from_manifests",
    "given_from_pipeline",
    "given_from_pod",
    "given_from_trainjob",
    "measured_seconds",
    "model_shape",
    "node_pod_patches",
    "pipeline_parameters",
    "plan_steps",
    "quantity",
    "recipe_for",
    "shape_from_config",
    "table",
    "training_need",
    "training_time_note",
    "zero_settings",
]
