"""Sizing preflight: what each step of a recipe needs (disk, host memory, GPU memory per rank), and
whether the Jobs and the compiled pipeline give it that much.

Nothing is loaded: the model's shape comes from its config.json (a local folder), a config.json
given with --model-config, the recipe's tiny-model settings, or a table of known shapes for the
paper's models (stored in S3, so not here). The formulas and their sources are in docs/sizing.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medcritical.errors import InputError, MissingInputError, UserError
from medcritical.recipe import TINY, Recipe, RecipeError, dump_recipe, load_recipe, load_recipe_text
from medcritical.runner import STAGES, keep_global_batch
from medcritical.shipped import benchmark_results_dir, deepspeed_dir, recipes_dir
from medcritical.training.common import DEEPSPEED_NAMES

GiB = 1024**3
CMEXAM_TRAIN_QUESTIONS = 54_497  # CMExam's official train split: the paper recipes use all of it
BUNDLED_QUESTIONS = 400
PROMPT_TOKENS = 1024  # a CMExam question with its options and the instruction, in Qwen tokens (generous)
BYTES_PER_TOKEN_JSON = 6  # a CJK token as \\uXXXX in JSON lines, the worst case
PER_RANK_OVERHEAD = 2 * GiB  # CUDA context, NCCL buffers, the allocator's fragmentation
HOST_OVERHEAD = 6 * GiB  # Python, CUDA and torch libraries, data loading
CPU_HOST_OVERHEAD = 2 * GiB  # the same without CUDA (measured: the demo's steps peak under 2 GiB RSS)
DISK_HEADROOM = 1.1  # logs, tokenizer files, partial files during upload


class PlanError(UserError, ValueError):
    """An input the plan cannot size or check (a model of unknown shape, a quantity that is none)."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer (Qwen2 family) that memory and disk depend on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = False
    context: int = 32_768  # max_position_embeddings: vLLM's context unless generation.max_model_len is set

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o
        mlp = 3 * h * i  # gate, up, down (SwiGLU)
        layer = attention + mlp + 2 * h  # two RMSNorms
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def lora_parameters(self, r: int) -> int:
        """LoRA on every linear layer (target_modules all-linear): r x (in + out) per layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)
        return self.num_layers * r * per_layer

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


# The paper's models, from their config.json on the Hugging Face hub (Qwen/Qwen2.5-7B-Instruct, Qwen/QwQ-32B).
KNOWN_SHAPES = {
    "Qwen2.5-7B-Instruct": ModelShape("Qwen2.5-7B-Instruct", 152_064, 3584, 18_944, 28, 28, 4, context=32_768),
    "QwQ-32B": ModelShape("QwQ-32B", 152_064, 5120, 27_648, 64, 40, 8, context=40_960),
}


def shape_from_config(config: dict, name: str) -> ModelShape:
    try:
        return ModelShape(
            name=name,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            context=int(config.get("max_position_embeddings") or 32_768),
        )
    except KeyError as e:
        raise PlanError(f"{name}: config.json has no {e.args[0]!r}; is it a decoder-only (Qwen2/Llama) model?") from e


def model_shape(uri: str | None, recipe: Recipe, model_config: str | Path | None = None) -> ModelShape:
    """The shape of the model at `uri` ("tiny", a local folder or s3://), without loading weights."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingInputError(
                f"--model-config {path}: no such file; give a model's config.json or its folder"
            ) from None
        except ValueError as e:  # not JSON, or not UTF-8
            raise InputError(f"--model-config {path}: not a JSON config ({e}); give the model's config.json") from None
        if not isinstance(config, dict):
            raise InputError(f"--model-config {path}: not a JSON object; give the model's config.json")
        return shape_from_config(config, str(model_config))
    uri = uri or recipe.model.base
    if uri == TINY:
        tiny = recipe.model.tiny
        return ModelShape(
            TINY,
            tiny.vocab_size,
            tiny.hidden_size,
            tiny.intermediate_size,
            tiny.num_layers,
            tiny.num_heads,
            tiny.num_heads,
            tie_embeddings=True,
        )
    local = Path(uri) / "config.json"
    if "://" not in uri and local.is_file():
        return shape_from_config(json.loads(local.read_text(encoding="utf-8")), uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    raise PlanError(
        f"{uri}: cannot read this model's config.json from here; pass --model-config PATH (its config.json) "
        f"or name a model of known shape ({', '.join(KNOWN_SHAPES)})"
    )


# -- what one step needs ---------------------------------------------------------------------------------


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

    # Activations of one micro-batch; DPO runs chosen and rejected together.
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
    activations += tokens * shape.vocab_size * (b + 3 * 4)

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


def measured_seconds(recipe: Recipe) -> tuple[dict[str, float], str] | None:
    """Per-step wall times measured for this very recipe (benchmarks/results/pipeline_e2e.json: the demo
    through the KFP local runner), and where; None when no benchmark ran this recipe."""
    results = benchmark_results_dir() / "pipeline_e2e.json"
    if not results.is_file():
        return None
    data = json.loads(results.read_text(encoding="utf-8"))
    raw = data.get("raw") or {}
    if data.get("status") != "ok" or not raw.get("recipe"):
        return None

    def comparable(r: Recipe) -> str:
        return dump_recipe(r.model_copy(update={"run": r.run.model_copy(update={"output_dir": None})}))

    try:
        measured = load_recipe_text(raw["recipe"])
    except RecipeError:  # measured with a recipe of an older schema: not this recipe
        return None
    if comparable(measured) != comparable(recipe):
        return None
    steps = {"data": "prepare-data", "distill": "distill", "sft": "sft", "eval-base": "evaluate"}
    seconds = {}
    for task in raw.get("kfp_tasks") or []:
        name = steps.get(task["step"]) or (
            "rollout" if task["step"].endswith("-rollout") else "dpo" if task["step"].endswith("-dpo") else None
        )
        if name and name not in seconds:
            seconds[name] = float(task["s"])
    if raw.get("kfp_total_s"):
        seconds["run"] = float(raw["kfp_total_s"])
    machine = data.get("machine") or {}
    where = f"{results.name}, {machine.get('cpu', '?')} x{machine.get('cpu_cores', '?')}, {data.get('started_at', '')}"
    return seconds, where


def training_time_note() -> str:
    """Time estimates need measured tokens/s on a GPU; say where they would come from when absent."""
    results = benchmark_results_dir() / "training_gpu.json"
    if results.is_file():
        status = json.loads(results.read_text(encoding="utf-8")).get("status")
        if status == "ok":
            return f"see {results.name} for tokens/s per GPU"
        return f"no estimate: {results.name} is {status!r} (python -m benchmarks.training_gpu on a GPU)"
    return "no estimate: no GPU benchmark figures in this checkout"


# -- what a manifest or the compiled pipeline gives -----------------------------------------------------------


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


@dataclass
class Given:
    """What one pod template (or pipeline task) offers a step."""

    where: str  # "Job/medcritical-sft" or "pipeline task sft"
    step: str
    overrides: list[str]
    recipe: str = ""  # a recipe of the image (the demo Job's) instead of the one checked; "" when mounted
    gpus: int = 0
    nodes: int = 1
    memory: int | None = None  # the memory limit (request when no limit)
    shm: int = 0
    work: int | None = None  # size of the volume holding the work folder; None: unknown (a claim)
    work_volume: str = ""
    ephemeral_request: int | None = None
    ephemeral_needed: bool = True  # the work folder is on the node's disk (emptyDir)
    memory_param: str = ""  # the pipeline parameter that sets the memory, if any
    gpu_param: str = ""  # the pipeline parameter that sets the GPU count, if any
    sized_by_plan: bool = False  # a TrainJob the pipeline sizes from this plan: only its GPUs are checked


@dataclass
class Problem:
    where: str
    step: str
    resource: str
    need: str
    have: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where} ({self.step}): {self.resource} needs {self.need}, has {self.have}; fix: {self.fix}"


STEP_COMMANDS = {"prepare-data", "distill", "sft", "rollout", "dpo", "evaluate", "run"}
DEFAULT_WORKDIR = "/home/medcritical/.cache/medcritical/work"  # ~/.cache/medcritical/work for the images' user


IMAGE_RECIPES = "/opt/medcritical/recipes/"  # the images copy recipes/ here


def _step_of(args: list[str]) -> tuple[str | None, list[str], str]:
    """(CLI step, --set overrides, the image's recipe it names if any) of a container's command line."""
    if "medcritical.cli" in args:
        args = args[args.index("medcritical.cli") + 1 :]
    positional = [a for a in args if not a.startswith("-")]
    step = positional[0] if positional else None
    if step == "stage" and len(positional) > 1:  # `medcritical stage sft ...`: the stage by its declared name
        step = positional[1].replace("_", "-")
    overrides = [args[k + 1] for k, a in enumerate(args[:-1]) if a == "--set"]
    recipe = next((args[k + 1] for k, a in enumerate(args[:-1]) if a == "--recipe"), "")
    own = recipe.removeprefix(IMAGE_RECIPES) if recipe.startswith(IMAGE_RECIPES) else ""
    return (step if step in STEP_COMMANDS else None), overrides, own


def _volume_size(volume: dict) -> tuple[int | None, bool]:
    """(size in bytes or None when unknown, on the node's disk)."""
    if "emptyDir" in volume:
        empty = volume["emptyDir"] or {}
        size = empty.get("sizeLimit")
        return (quantity(size) if size else None), empty.get("medium") != "Memory"
    if "ephemeral" in volume:
        claim = (volume["ephemeral"].get("volumeClaimTemplate") or {}).get("spec") or {}
        size = ((claim.get("resources") or {}).get("requests") or {}).get("storage")
        return (quantity(size) if size else None), False
    return None, False  # a PersistentVolumeClaim: its size is the claim's


def given_from_pod(where: str, pod: dict, nodes: int = 1) -> Given | None:
    containers = pod.get("containers") or []
    for container in containers:
        step, overrides, own_recipe = _step_of([*(container.get("command") or []), *(container.get("args") or [])])
        if step:
            break
    else:
        return None
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    memory = limits.get("memory") or requests.get("memory")
    given = Given(
        where,
        step,
        overrides,
        gpus=int(limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0))),
        nodes=nodes,
        memory=quantity(memory) if memory else None,
        recipe=own_recipe,
    )
    if requests.get("ephemeral-storage"):
        given.ephemeral_request = quantity(requests["ephemeral-storage"])
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    workdir = env.get("MEDCRITICAL_WORKDIR") or DEFAULT_WORKDIR
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(m.get("mountPath", "")))
    for mount in mounts:
        path = mount.get("mountPath", "")
        if mount.get("mountPath") == "/dev/shm":
            size, _ = _volume_size(volumes.get(mount.get("name"), {}))
            given.shm = size or 0
        if (workdir == path or workdir.startswith(path.rstrip("/") + "/")) and not given.work_volume:
            given.work_volume = mount.get("name")
            given.work, given.ephemeral_needed = _volume_size(volumes.get(mount.get("name"), {}))
    if not given.work_volume:
        given.work, given.ephemeral_needed = None, True  # the container's writable layer: ephemeral storage
    return given


def _manifest_documents(file: Path) -> list:
    try:
        return list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValueError) as e:  # ValueError: not UTF-8
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(
            f"--manifests {file}: not valid YAML{where} ({problem}); fix it, or pass --no-manifests"
        ) from None


def given_from_manifests(paths: list[Path]) -> list[Given]:
    """Every step pod in YAML files or folders (Jobs, PyTorchJobs, TrainJobs; kustomize output works too)."""
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*.yaml") if p.name != "kustomization.yaml") if path.is_dir() else [path]
    found = []
    for file in files:
        for doc in _manifest_documents(file):
            if not isinstance(doc, dict):
                continue
            kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
            where = f"{kind}/{name} ({file})"
            spec = doc.get("spec") or {}
            if kind == "Job":
                given = given_from_pod(where, (spec.get("template") or {}).get("spec") or {})
            elif kind == "PyTorchJob":
                replicas = spec.get("pytorchReplicaSpecs") or {}
                nodes = sum(int((r or {}).get("replicas", 1)) for r in replicas.values())
                master = (replicas.get("Master") or {}).get("template", {}).get("spec") or {}
                given = given_from_pod(where, master, nodes)
            elif kind == "TrainJob":
                given = given_from_trainjob(where, doc)
            else:
                continue
            if given:
                found.append(given)
    return found


def node_pod_patches(spec: dict, job: str = "node") -> list[dict]:
    """The pod-spec patches a TrainJob's runtimePatches apply to the runtime's replicated `job`, in order
    (Trainer v2.2; what the plan and the manifest checks read volumes and security contexts from)."""
    found = []
    for patch in spec.get("runtimePatches") or []:
        runtime = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for replicated in runtime.get("replicatedJobs") or []:
            if replicated.get("name") == job:
                pod = (((replicated.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec")
                if pod:
                    found.append(pod)
    return found


def given_from_trainjob(where: str, doc: dict) -> Given | None:
    """A TrainJob: its trainer's command, resources per node and node count; volumes from its runtimePatches."""
    spec = doc.get("spec") or {}
    trainer = spec.get("trainer") or {}
    pod: dict = {
        "volumes": [],
        "containers": [
            {
                "command": trainer.get("command") or [],
                "args": trainer.get("args") or [],
                "resources": trainer.get("resourcesPerNode") or {},
                "env": trainer.get("env") or [],
                "volumeMounts": [],
            }
        ],
    }
    for patch in node_pod_patches(spec):
        pod["volumes"] += patch.get("volumes") or []
        for container in patch.get("containers") or []:
            if container.get("name") == "node":
                pod["containers"][0]["volumeMounts"] += container.get("volumeMounts") or []
    return given_from_pod(where, pod, int(trainer.get("numNodes", 1)))


def _global_batch_problems(need: Need, given: Given, recipe: Recipe) -> list[Problem]:
    """The runner divides the gradient accumulation by the world size (runner.keep_global_batch) or
    refuses the run: the same rule, checked before anything starts."""
    world = max(given.gpus, 1) * given.nodes
    try:
        keep_global_batch(STAGES[need.step], recipe, world)
    except RecipeError:
        key = "sft.trainer" if need.step == "sft" else "selfplay.dpo.trainer"
        accumulation = need.accumulation
        return [
            Problem(
                given.where,
                need.step,
                "global batch",
                f"{key}.gradient_accumulation_steps a multiple of the {world} ranks",
                str(accumulation),
                f"give the recipe's batch as on one GPU, e.g. --set {key}.gradient_accumulation_steps="
                f"{-(-accumulation // world) * world} (the runner divides it by the {world} ranks)",
            )
        ]
    return []


def check(need: Need, given: Given, gpu_memory: int, recipe: Recipe | None = None) -> list[Problem]:
    """The manifest's resources against the step's need (and, given the pod's recipe, its global batch)."""
    problems = []
    step, where = need.step, given.where
    in_pipeline = where.startswith("pipeline")
    recompile = "recompile the pipeline for this recipe (`medcritical compile --recipe ...`)"
    if need.gpus and not given.gpus:
        fix = (
            f"--param {given.gpu_param}={need.gpus}"
            if given.gpu_param
            else recompile
            if in_pipeline
            else "request nvidia.com/gpu (limits = requests)"
        )
        problems.append(Problem(where, step, "GPUs", f"{need.gpus}", "none", fix))
    if need.gpus and given.gpus and given.gpus < need.gpus and step not in ("sft", "dpo"):
        fix = (
            f"--param {given.gpu_param}={need.gpus}"
            if given.gpu_param
            else "as many GPUs as tensor_parallel_size (generation or distill.local)"
        )
        problems.append(Problem(where, step, "GPUs", str(need.gpus), str(given.gpus), fix))
    if need.gpu_memory > gpu_memory:
        problems.append(
            Problem(
                where,
                step,
                "GPU memory per rank",
                gib(need.gpu_memory),
                gib(gpu_memory),
                "more GPUs (ZeRO-3 shards weights, gradients and optimizer), LoRA, a shorter "
                "max_length or a smaller per_device_train_batch_size"
                if step in ("sft", "dpo", "run")
                else "a larger tensor_parallel_size (generation or distill.local) with as many GPUs, a shorter "
                "generation.max_model_len, or a higher gpu_memory_utilization",
            )
        )
    if recipe is not None and step in ("sft", "dpo"):
        problems += _global_batch_problems(need, given, recipe)
    if given.sized_by_plan:  # a TrainJob the pipeline sizes from this very plan: memory and disk fit
        return problems
    memory_need = need.host_memory + given.shm
    if given.memory is None or given.memory < memory_need:
        fix = (
            f"--param {given.memory_param}={gib(memory_need)} (submit and plan)"
            if given.memory_param
            else recompile
            if in_pipeline
            else f"resources.limits.memory and requests.memory >= {gib(memory_need)}"
        )
        problems.append(
            Problem(
                where,
                step,
                "memory",
                gib(memory_need) + " (host + /dev/shm)",
                gib(given.memory) if given.memory else "no limit",
                fix,
            )
        )
    if given.work is not None and given.work < need.disk:
        volume = given.work_volume or "the root filesystem"
        fix = (
            recompile + ": it sizes the work volumes from this plan"
            if in_pipeline
            else f"put MEDCRITICAL_WORKDIR on a volume of >= {gib(need.disk)} (emptyDir sizeLimit)"
        )
        problems.append(Problem(where, step, f"work folder volume {volume!r}", gib(need.disk), gib(given.work), fix))
    if given.ephemeral_needed and (given.ephemeral_request or 0) < need.disk:
        problems.append(
            Problem(
                where,
                step,
                "ephemeral-storage request",
                gib(need.disk),
                gib(given.ephemeral_request) if given.ephemeral_request else "none",
                f"requests.ephemeral-storage >= {gib(need.disk)}, or the kubelet evicts the pod",
            )
        )
    return problems


def recipe_for(recipe: Recipe, given: Given) -> Recipe:
    """The recipe a pod runs: the checked one (or the image's own, for the demo Job) with the pod's --set overrides."""
    if given.recipe:
        local = recipes_dir() / given.recipe
        recipe = load_recipe(local if local.is_file() else Path("recipes") / given.recipe)
    return load_recipe_text(dump_recipe(recipe), given.overrides) if given.overrides else recipe


@dataclass
class Verdict:
    given: Given
    need: Need
    problems: list[Problem]


def check_manifests(
    recipe: Recipe,
    givens: list[Given],
    *,
    gpu_memory: int,
    model_config: str | None = None,
    teacher_config: str | None = None,
) -> list[Verdict]:
    verdicts = []
    for given in givens:
        pod_recipe = recipe_for(recipe, given)
        needs = plan_steps(
            pod_recipe,
            train_gpus=max(given.gpus, 1),
            nodes=given.nodes,
            model_config=model_config,
            teacher_config=teacher_config,
        )
        need = needs[given.step]
        verdicts.append(Verdict(given, need, check(need, given, gpu_memory, pod_recipe)))
    return verdicts


def failing_steps(verdicts: list[Verdict]) -> dict[str, list[Problem]]:
    """Steps none of whose manifests fit (a step may have several: one GPU, several nodes)."""
    by_step: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_step.setdefault(verdict.need.step, []).append(verdict)
    return {
        step: [p for v in found for p in v.problems]
        for step, found in by_step.items()
        if all(v.problems for v in found)
    }


# -- the compiled pipeline ----------------------------------------------------------------------------------


def pipeline_parameters(doc: dict) -> dict[str, dict]:
    """The compiled pipeline's parameters: name -> {"parameterType": ..., "defaultValue": ...}."""
    return (doc["root"].get("inputDefinitions") or {}).get("parameters", {})


def given_from_pipeline(path: Path, params: dict) -> list[Given]:
    """Each task of the compiled pipeline as a Given: GPUs (pipeline parameters), memory, volumes.

    `params` are the run's parameters (checked: pipeline_runner.check_params); the others keep their
    defaults. With train_nodes > 1 the sft and dpo tasks run as a TrainJob of train_nodes x node_gpus
    GPUs, sized by this plan when it is created (trainjob.py): only its GPUs are checked."""
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    pipeline, platform = docs[0], (docs[1] if len(docs) > 1 else {})
    defaults = {name: p.get("defaultValue") for name, p in pipeline_parameters(pipeline).items()}
    defaults.update(params)
    executors = pipeline["deploymentSpec"]["executors"]
    k8s = ((platform.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec", {}).get("executors", {})
    nodes = int(defaults.get("train_nodes") or 1)
    found = []
    for task_name, task in pipeline["root"]["dag"]["tasks"].items():
        executor = pipeline["components"][task["componentRef"]["name"]]["executorLabel"]
        step = task_name.split("-")[0] if not task_name.startswith("prepare-data") else "prepare-data"
        step = {"prepare_data": "prepare-data"}.get(step, step)
        if step not in STEP_COMMANDS:
            continue
        if step in ("sft", "dpo") and nodes > 1:
            gpus = int(defaults.get("node_gpus") or 0)
            found.append(
                Given(
                    f"pipeline task {task_name} as a TrainJob of {nodes} x {gpus} GPUs ({path})",
                    step,
                    [],
                    gpus=gpus,
                    nodes=nodes,
                    gpu_param="node_gpus",
                    sized_by_plan=True,
                )
            )
            continue
        resources = executors[executor]["container"].get("resources") or {}
        given = Given(f"pipeline task {task_name} ({path})", step, [])
        accelerator = resources.get("accelerator") or {}
        count = accelerator.get("resourceCount") or accelerator.get("count")
        if count is not None:
            given.gpus = int(_param_value(count, task, defaults))
            given.gpu_param = _param_name(count)
        memory = resources.get("resourceMemoryLimit")
        if memory:
            given.memory = quantity(_param_value(memory, task, defaults))
            given.memory_param = _param_name(memory)
        settings = k8s.get(executor) or {}
        env = {e["name"]: e.get("value") for e in executors[executor]["container"].get("env") or []}
        workdir = env.get("MEDCRITICAL_WORKDIR")
        given.work, given.ephemeral_needed = None, True  # the container's writable layer
        for mount in settings.get("emptyDirMounts") or []:
            if mount.get("mountPath") == "/dev/shm":
                given.shm = quantity(mount.get("sizeLimit", 0))
            elif workdir and mount.get("mountPath") == workdir:
                # A size-limited emptyDir: the kubelet evicts past the limit. KFP cannot request
                # ephemeral-storage for a task, so the node's free disk is not checked (docs/sizing.md).
                size = mount.get("sizeLimit")
                given.work, given.work_volume = (quantity(size) if size else None), mount["volumeName"]
                given.ephemeral_needed = False
        for volume in settings.get("genericEphemeralVolume") or []:
            if workdir and volume.get("mountPath") == workdir:
                given.work, given.work_volume, given.ephemeral_needed = (
                    quantity(volume["size"]),
                    volume["volumeName"],
                    False,
                )
        for volume in settings.get("pvcMount") or []:
            if workdir and volume.get("mountPath") == workdir:
                given.work, given.work_volume, given.ephemeral_needed = None, "PVC", False
        found.append(given)
    return found


def _param_name(value) -> str:
    match = re.search(r"pipelinechannel--([A-Za-z0-9_]+)", str(value))
    return match.group(1) if match else ""


def _param_value(value, task: dict, defaults: dict):
    """A task input bound to a pipeline parameter (`{{$.inputs.parameters['pipelinechannel--train_gpus']}}`)."""
    name = _param_name(value)
    return defaults.get(name, 0) if name else value


def table(needs: dict[str, Need], seconds: dict[str, float] | None = None) -> str:
    seconds = seconds or {}
    rows = [("step", "GPUs", "GPU mem/rank", "host mem", "disk (work folder)", "time", "notes")]
    for need in needs.values():
        rows.append(
            (
                need.step,
                str(need.gpus * need.nodes) if need.gpus else "-",
                gib(need.gpu_memory) if need.gpu_memory else "-",
                gib(need.host_memory),
                gib(need.disk),
                f"{seconds[need.step]:.0f} s" if need.step in seconds else "-",
                "; ".join(need.notes + [f"{k} {gib(v)}" for k, v in need.parts.items() if v >= GiB]),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    return "\n".join("  ".join(cell.ljust(widths[c]) if c < 6 else cell for c, cell in enumerate(row)) for row in rows)
