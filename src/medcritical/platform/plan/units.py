"""Kubernetes quantities in bytes, and the error every part of the plan raises."""

from __future__ import annotations

import math

from medcritical.errors import UserError

GiB = 1024**3


class PlanError(UserError, ValueError):
    """An input the plan cannot size or check (a model of unknown shape, a quantity that is none)."""


def quantity(value) -> int:
    """A Kubernetes quantity ("96Gi", "500G", "500m", 1024) in bytes, rounded up, as the API server parses it."""
    from kubernetes.utils import parse_quantity

    try:
        parsed = parse_quantity(value)
    except (ValueError, TypeError):
        parsed = None
    if parsed is None or parsed < 0:
        raise PlanError(f"{value!r} is not a Kubernetes quantity such as 96Gi, 500G or 512Mi")
    return math.ceil(parsed)


def gib(value: int) -> str:
    return f"{math.ceil(value / GiB)}Gi"
