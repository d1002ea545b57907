"""What each step of a recipe needs: disk, host memory and GPU memory per rank (formulas: docs/sizing.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medcritical.core.shipped import deepspeed_dir
from medcritical.orchestration.recipe import TINY, Recipe
from medcritical.platform.plan.shapes import ModelShape, model_shape
from medcritical.platform.plan.units import GiB, PlanError
from medcritical.training.common import DEEPSPEED_NAMES

CMEXAM_TRAIN_QUESTIONS = 54_497  # CMExam's official train split: the paper recipes use all of it
BUNDLED_QUESTIONS = 400
PROMPT_TOKENS = 1024  # a CMExam question with its options and the instruction, in Qwen tokens (generous)
BYTES_PER_TOKEN_JSON = 6  # a CJK token as \\uXXXX in JSON lines, the worst case
PER_RANK_OVERHEAD = 2 * GiB  # CUDA context, NCCL buffers, the allocator's fragmentation
HOST_OVERHEAD = 6 * GiB  # Python, CUDA and torch libraries, data loading
CPU_HOST_OVERHEAD = 2 * GiB  # the same without CUDA (measured: the demo's steps peak under 2 GiB RSS)
DISK_HEADROOM = 1.1  # logs, tokenizer files, partial files during upload


@dataclass
class Need:
    step: str
    gpus: int  # GPUs per pod this need was computed for (0: a CPU step)
    nodes: int = 1
    disk: int = 0  # the work folder: downloads, checkpoints, outputs before upload
    host_memory: int = 0  # excluding /dev/shm, which the manifest adds
    gpu_memory: int = 0  # per rank
    parts: dict[str, int] = field(default_factory=dict)  # the largest terms, for the table's notes
    accumulation: int = 1  # training steps: the recipe's gradient accumulation
    notes: list[str] = field(default_factory=list)


def _dtype_bytes(recipe: Recipe) -> int:
    if recipe.model.dtype == "float32" or (recipe.model.dtype == "auto" and recipe.run.device == "cpu"):
        return 4
    return 2


def zero_settings(value: str | None) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded to CPU) of a section's `deepspeed`: a bare name or a JSON path.

    A path that is not here (a Job's path inside the image) is read from recipes/deepspeed/ by its name."""
    if not value:
        return 0, False

    path = Path(value)
    if not path.is_file():
        stem = path.name.removesuffix(".json")
        if stem not in DEEPSPEED_NAMES:
            raise PlanError(f"deepspeed: {value!r} is not here and not one of {', '.join(DEEPSPEED_NAMES)}")
        path = deepspeed_dir() / f"{stem}.json"
    zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
    return int(zero.get("stage", 0)), offload


def _questions(recipe: Recipe) -> int:
    if recipe.data.train_size:
        return recipe.data.train_size
    return BUNDLED_QUESTIONS if recipe.data.source == "bundled" else CMEXAM_TRAIN_QUESTIONS


def _activation_bytes(step: str, settings: dict, shape: ModelShape, b: int) -> int:
    """Activations of one micro-batch (after Korthikanti et al. 2022); DPO runs chosen and rejected together."""
    batch = settings["per_device_train_batch_size"] * (2 if step == "dpo" else 1)
    tokens = batch * settings["max_length"]
    h, i = shape.hidden_size, shape.intermediate_size
    layer_bytes = tokens * (15 * h + 6 * i)  # one layer's saved tensors (bf16), SwiGLU MLP, SDPA attention
    if settings.get("activation_checkpointing"):
        activations = shape.num_layers * tokens * h * b + layer_bytes
    else:
        activations = shape.num_layers * layer_bytes
    # The loss over the vocabulary: the logits in the compute dtype, their fp32 upcast, the log-softmax
    # output (fp32) and its gradient (fp32): the largest tensors of a step at Qwen's 152k vocabulary.
    return activations + tokens * shape.vocab_size * (b + 3 * 4)


def training_need(step: str, recipe: Recipe, shape: ModelShape, gpus: int, nodes: int = 1) -> Need:
    """SFT or DPO: ZeRO paper memory (Rajbhandari et al. 2020, §3.1: 2Ψ + 2Ψ + KΨ, K = 12 for mixed-precision
    Adam), activations after Korthikanti et al. 2022, DPO's reference model; see docs/sizing.md."""
    section = recipe.sft if step == "sft" else recipe.selfplay.dpo
    settings, lora = section.settings, section.lora
    world = max(gpus, 1) * nodes
    stage, offload = zero_settings(section.deepspeed)
    b = _dtype_bytes(recipe)
    psi = shape.parameters
    weights_file = 2 * psi if b == 2 else 4 * psi
    need = Need(step, gpus, nodes, accumulation=settings.get("gradient_accumulation_steps", 1))

    weights = b * psi / (world if stage == 3 else 1)  # with LoRA: the frozen base, in the compute dtype
    trained = shape.lora_parameters(lora.r) if lora.enabled else psi
    grads = b * trained / (world if stage >= 2 else 1)
    optimizer_bytes = (12 if b == 2 else 8) * trained / (world if stage >= 1 else 1)
    if offload:
        need.parts["optimizer on CPU"] = int(optimizer_bytes)
        optimizer_bytes = 0

    activations = _activation_bytes(step, settings, shape, b)
    reference = 0
    if step == "dpo" and not lora.enabled and not settings.get("precompute_ref_log_probs"):
        reference = b * psi / (world if stage == 3 else 1)  # a second frozen copy; LoRA disables the adapter

    if not lora.enabled and b == 2 and stage in (2, 3):
        # Full fine-tuning under ZeRO-2/3: DeepSpeed's own estimate of the model states, which also counts
        # the fp32 gradient copy at the optimizer step (18 bytes per parameter over the ranks, not 16) and,
        # at ZeRO-3, the largest layer gathered whole (4 bytes per parameter of it).
        states = deepspeed_model_states(shape, stage, max(gpus, 1), nodes, offload)
        weights, grads, optimizer_bytes = 0, 0, 0
        need.parts["model states (DeepSpeed's estimate)"] = int(states)
    else:
        states = 0
    for name, value in (
        ("weights", weights),
        ("gradients", grads),
        ("optimizer", optimizer_bytes),
        ("activations", activations),
        ("DPO reference", reference),
    ):
        if value:
            need.parts[name] = int(value)
    need.gpu_memory = int(states + weights + grads + optimizer_bytes + activations + reference + PER_RANK_OVERHEAD)

    # Host: every rank of the node loads the weights on CPU first (ZeRO-3 loads them partitioned through
    # rank 0); saving gathers them on rank 0; a LoRA merge reloads the base on CPU.
    ranks = max(gpus, 1)
    load = weights_file + ranks * weights_file / world if stage == 3 else ranks * weights_file
    merge = 2 * weights_file if lora.enabled and lora.merge else weights_file
    offloaded = need.parts.get("optimizer on CPU", 0) * ranks
    need.host_memory = int(max(load, merge) + offloaded + (HOST_OVERHEAD if gpus else CPU_HOST_OVERHEAD))

    # Disk: the input model, checkpoints (save_total_limit + the one being written), the final model.
    # A checkpoint: 16-bit weights + fp32 master weights and Adam moments (2 + 12 bytes per trained
    # parameter; with LoRA only the adapter's, rounded up to 16 for fp32 adapter weights).
    checkpoint = 16 * trained if lora.enabled else weights_file + 12 * psi
    checkpoints = ((settings.get("save_total_limit") or 10) + 1) * checkpoint  # None keeps all: assume 10
    final = weights_file + (2 * trained if lora.enabled else 0)
    # The training file: a trace per question (SFT) or up to max_pairs_per_question pairs of two answers (DPO).
    rows = 1 if step == "sft" else 2 * recipe.selfplay.pairs.max_pairs_per_question
    data = _questions(recipe) * rows * settings["max_length"] * BYTES_PER_TOKEN_JSON
    need.disk = int((weights_file + checkpoints + final + data) * DISK_HEADROOM)
    need.parts.update({"input model": weights_file, "checkpoints": int(checkpoints), "final model": int(final)})
    need.notes.append(
        f"ZeRO-{stage}{' offload' if offload else ''}, {f'LoRA r={lora.r}' if lora.enabled else 'full'}, "
        f"{world} rank(s)"
    )
    return need


def deepspeed_model_states(shape: ModelShape, stage: int, gpus_per_node: int, nodes: int, offload: bool) -> int:
    """GPU bytes per rank of the model states under ZeRO-2/3, from DeepSpeed's memory estimators
    (deepspeed.runtime.zero: estimate_zero{2,3}_model_states_mem_needs)."""
    import logging  # deepspeed logs its accelerator choice on import; the plan's table is the output

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        largest_layer = max(shape.vocab_size * shape.hidden_size, shape.parameters // max(shape.num_layers, 1))
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.parameters, largest_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=False
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(shape.parameters, gpus_per_node, nodes, cpu_offload=offload)
    return int(gpu)


def generation_need(
    step: str,
    recipe: Recipe,
    shape: ModelShape,
    gpus: int,
    *,
    tensor_parallel: int,
    utilization: float,
    max_new_tokens: int,
    samples: int,
    backend: str,
    max_model_len: int | None = None,
) -> Need:
    """vLLM (or transformers) generation: weights over tensor_parallel GPUs plus the KV cache. vLLM reserves
    room for one sequence of its context, `max_model_len` (None: the model's own context)."""
    need = Need(step, gpus)
    b = _dtype_bytes(recipe)
    weights_file = 2 * shape.parameters if b == 2 else 4 * shape.parameters
    sequence = PROMPT_TOKENS + max_new_tokens
    if backend == "vllm":
        context = max_model_len or shape.context
        if context < sequence:
            raise PlanError(
                f"generation.max_model_len {context} is shorter than the {step} step's prompt and reply "
                f"({PROMPT_TOKENS} + {max_new_tokens} tokens): vLLM would cut the replies; set it to at least {sequence}"
            )
        sequence = context
    kv_one = shape.kv_bytes_per_token(b) * sequence
    tp = max(tensor_parallel, 1)
    if backend == "vllm":
        # vLLM refuses to start unless weights + one max-length sequence's KV fit in utilization x memory.
        need.gpu_memory = int((b * shape.parameters / tp + kv_one / tp + PER_RANK_OVERHEAD) / utilization)
        need.notes.append(f"vLLM tp={tp}, {utilization:.0%} of the GPU, context {sequence}")
    else:
        batch = recipe.generation.batch_size
        need.gpu_memory = int(b * shape.parameters + batch * kv_one + PER_RANK_OVERHEAD)
    need.parts = {"weights": int(b * shape.parameters / tp), "KV cache, one sequence": int(kv_one / tp)}
    swap = 4 * GiB * tp if backend == "vllm" else 0  # vLLM's CPU swap space per GPU
    # The weight shards pass through host memory on their way to the GPUs.
    need.host_memory = int(weights_file / tp + swap + (HOST_OVERHEAD if gpus else CPU_HOST_OVERHEAD))
    outputs = _questions(recipe) * samples * max_new_tokens * BYTES_PER_TOKEN_JSON
    need.disk = int((weights_file + outputs) * DISK_HEADROOM)
    need.parts["outputs"] = int(outputs)
    return need


def cpu_need(step: str, recipe: Recipe, outputs: int = 0) -> Need:
    return Need(step, 0, disk=int((outputs + GiB) * DISK_HEADROOM), host_memory=CPU_HOST_OVERHEAD)


def plan_steps(
    recipe: Recipe,
    *,
    train_gpus: int | None = None,
    nodes: int = 1,
    model_config: str | None = None,
    teacher_config: str | None = None,
) -> dict[str, Need]:
    """The need of every step the pipeline runs, keyed by the CLI's step name; the training steps on
    `train_gpus` GPUs per pod (default: the recipe's run.train_gpus, the GPUs it is written for)."""
    train_gpus = recipe.run.train_gpus if train_gpus is None else train_gpus
    shape = model_shape(recipe.model.base, recipe, model_config)
    gen = recipe.generation
    on_gpu = recipe.run.device != "cpu" and shape.name != TINY
    infer_gpus = gen.tensor_parallel_size if on_gpu else 0
    needs = {"prepare-data": cpu_need("prepare-data", recipe)}

    distill = recipe.distill
    if distill.backend in ("vllm", "transformers"):
        teacher = model_shape(distill.teacher_model, recipe, teacher_config)
        needs["distill"] = generation_need(
            "distill",
            recipe,
            teacher,
            distill.local.tensor_parallel_size if on_gpu else 0,
            tensor_parallel=distill.local.tensor_parallel_size,
            utilization=distill.local.gpu_memory_utilization,
            max_new_tokens=distill.max_new_tokens,
            samples=distill.attempts,
            backend=distill.backend,
        )
    else:  # an API teacher or the explanations: no GPU, only the traces on disk
        traces = _questions(recipe) * distill.attempts * distill.max_new_tokens * BYTES_PER_TOKEN_JSON
        needs["distill"] = cpu_need("distill", recipe, traces)
        needs["distill"].notes.append(f"{distill.backend} teacher: no GPU")
    train = train_gpus if on_gpu else 0
    needs["sft"] = training_need("sft", recipe, shape, train, nodes)
    rollout = recipe.selfplay.rollout
    needs["rollout"] = generation_need(
        "rollout",
        recipe,
        shape,
        infer_gpus,
        tensor_parallel=gen.tensor_parallel_size,
        utilization=gen.gpu_memory_utilization,
        max_new_tokens=rollout.max_new_tokens * 2,  # a correction sees the answer
        samples=rollout.samples_per_question + recipe.selfplay.correction.attempts,
        backend=gen.backend,
        max_model_len=gen.max_model_len,
    )
    needs["dpo"] = training_need("dpo", recipe, shape, train, nodes)
    needs["evaluate"] = generation_need(
        "evaluate",
        recipe,
        shape,
        infer_gpus,
        tensor_parallel=gen.tensor_parallel_size,
        utilization=gen.gpu_memory_utilization,
        max_new_tokens=gen.max_new_tokens,
        samples=1,
        backend=gen.backend,
        max_model_len=gen.max_model_len,
    )
    if not on_gpu:
        for need in needs.values():
            need.gpus, need.gpu_memory = 0, 0
            if shape.name == TINY:
                need.notes.append("tiny model")
    # The demo Job runs every step in one pod, one after the other: the sum of the disks, the largest memory.
    needs["run"] = Need(
        "run",
        max(n.gpus for n in needs.values()),
        disk=sum(n.disk for n in needs.values()),
        host_memory=max(n.host_memory for n in needs.values()),
        gpu_memory=max(n.gpu_memory for n in needs.values()),
    )
    return needs
