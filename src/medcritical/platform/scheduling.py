"""Where the GPU work is scheduled: the GPU product, the Kueue queue, as the pipeline and its TrainJobs set them.

- `gpu_product`: the value of the `nvidia.com/gpu.product` node label (GPU feature discovery / the GPU
  operator sets it, e.g. NVIDIA-H100-80GB-HBM3); the GPU tasks and the TrainJobs' pods then select those
  nodes. A nodeSelector, not an affinity: KFP backends take a parameterised node affinity only from 2.14.0,
  a parameterised nodeSelector from 2.5.0 (the pipeline's minimum). One product, so no list.
- `kueue_queue`: a Kueue LocalQueue; the label `kueue.x-k8s.io/queue-name` on a TrainJob (and, compiled with
  `--kueue-queue`, on the GPU tasks' pods) hands it to Kueue, which admits it when the queue has quota.
- `kueue_priority`: a Kueue WorkloadPriorityClass (label `kueue.x-k8s.io/priority-class`), the order in which
  Kueue admits and preempts. The pipeline's only priority: neither KFP (its pod spec has no priorityClassName,
  through 2.17) nor Trainer v2.2's runtimePatches can set a pod's PriorityClass.

"" means not set, everywhere.
"""

from __future__ import annotations

import re

from medcritical.errors import InputError

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"

# A label value: at most 63 characters, alphanumerics with '-', '_' and '.' inside (an empty value is "not set").
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# A LocalQueue's name: an object name that is also a label value (RFC 1123 label).
_QUEUE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class SchedulingError(InputError):
    pass


def check_gpu_product(value: str, what: str = "gpu_product") -> str:
    value = str(value or "").strip()
    if value and not _LABEL_VALUE.match(value):
        raise SchedulingError(
            f"{what}={value!r}: one value of the node label {GPU_PRODUCT_LABEL} (at most 63 letters, digits, "
            "'-', '_', '.'), e.g. NVIDIA-H100-80GB-HBM3; `kubectl get nodes -L nvidia.com/gpu.product` lists them"
        )
    return value


def check_queue(value: str, what: str = "kueue_queue", kind: str = "LocalQueue") -> str:
    value = str(value or "").strip()
    if value and not _QUEUE.match(value):
        raise SchedulingError(
            f"{what}={value!r}: the name of a Kueue {kind} (lower-case letters, digits and '-', at most 63); "
            f"`kubectl get {kind.lower()}s` lists them"
        )
    return value


def check_priority(value: str, what: str = "kueue_priority") -> str:
    return check_queue(value, what, kind="WorkloadPriorityClass")


def gpu_node_selector(node_selector: dict | None, gpu_product: str) -> dict:
    """The GPU tasks' nodeSelector: the `node_selector` parameter and, when set, the GPU product."""
    selector = dict(node_selector or {})
    product = check_gpu_product(gpu_product)
    if product:
        given = selector.get(GPU_PRODUCT_LABEL)
        if given not in (None, product):
            raise SchedulingError(
                f"gpu_product={product!r} and node_selector's {GPU_PRODUCT_LABEL}={given!r} disagree; set one"
            )
        selector[GPU_PRODUCT_LABEL] = product
    return selector


def queue_labels(kueue_queue: str, kueue_priority: str = "") -> dict:
    """The Kueue labels of a workload: its LocalQueue and WorkloadPriorityClass, those that are set."""
    labels = {QUEUE_LABEL: check_queue(kueue_queue), PRIORITY_LABEL: check_priority(kueue_priority)}
    return {key: value for key, value in labels.items() if value}
