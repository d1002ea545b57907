"""The MedCritical pipeline: data → distill → sft → R × (rollout → dpo) → evaluate → report.

The same pipeline function runs on a cluster (compiled YAML, `kfp run submit`) and on one machine
(KFP's local subprocess runner, `medcritical run`). Only the cluster build adds Kubernetes settings
(GPUs, tolerations, node selector, /dev/shm, the S3 Secret); those are pipeline parameters where KFP
allows it, so one compiled file serves many clusters.

The number of self-play rounds is fixed when the pipeline is built (KFP graphs are static); the
`configure` step refuses a recipe whose `selfplay.rounds` differs from the compiled graph.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from kfp import dsl, kubernetes

from medcritical import __version__
from medcritical.components import distill, dpo, evaluate, prepare_data, report, rollout, sft
from medcritical.orchestration.runner import STAGES
from medcritical.orchestration.staging import eval_folder, final_model_label, stage_folder
from medcritical.platform.scheduling import queue_labels

PIPELINE_NAME = "medcritical"
S3_SECRET_KEYS = ("MEDCRITICAL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Endpoint settings for a teacher / judge behind an API, from optional Secrets (as the Jobs read them).
TEACHER_SECRET_KEYS = ("MEDCRITICAL_TEACHER_API_KEY", "MEDCRITICAL_TEACHER_BASE_URL", "MEDCRITICAL_TEACHER_MODEL")
JUDGE_SECRET_KEYS = ("MEDCRITICAL_JUDGE_API_KEY", "MEDCRITICAL_JUDGE_BASE_URL", "MEDCRITICAL_JUDGE_MODEL")


# The repository name of each kind of image, as images/build.sh tags them.
IMAGE_REPOSITORIES = {"cpu": "medcritical-cpu", "train": "medcritical-train-cuda", "infer": "medcritical-infer-cuda"}


def image_names(
    registry: str = "", version: str = __version__, digests: dict[str, str] | None = None
) -> dict[str, str]:
    """The image of each kind, as images/build.sh tags them; with `digests` (repository name -> sha256:...,
    what the build pushed) pinned as `name:tag@sha256:...`: the runtime pulls that digest, the tag stays readable."""
    digests = digests or {}
    return {
        kind: f"{registry}{name}:{version}" + (f"@{digests[name]}" if name in digests else "")
        for kind, name in IMAGE_REPOSITORIES.items()
    }


@dataclass
class ClusterSettings:
    """Kubernetes settings baked in at compile time (KFP cannot take these from parameters)."""

    shm_size: str = "16Gi"  # /dev/shm for NCCL and vLLM; the container default of 64 MB breaks both
    images: dict[str, str] = field(default_factory=image_names)
    # A PersistentVolumeClaim for every step's work folder (downloads, checkpoints, partial rollouts):
    # a retried pod then resumes where the failed one stopped. "": a size-limited emptyDir per task,
    # sized by the plan (lost on retry). Not a generic ephemeral volume: a fresh EBS/PD/Azure Disk/Ceph
    # RBD volume is root:root 0755, the images run as UID 10001 and KFP cannot set the pod's fsGroup,
    # so the first download would fail; an emptyDir is writable by any UID.
    work_pvc: str = ""
    # The student's / a local teacher's config.json when the model is in S3 and not of a shape the plan
    # knows: the plan sizes every task from it (`medcritical compile --model-config`).
    model_config: str | None = None
    teacher_config: str | None = None
    # A Kueue LocalQueue for the GPU tasks' pods (label kueue.x-k8s.io/queue-name) and the default of the
    # `kueue_queue` parameter (the TrainJobs'): KFP's pod labels are constants of the compiled pipeline.
    kueue_queue: str = ""
    # Its Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-class), the same way: KFP sets no
    # priorityClassName on a task's pod, so under Kueue this is the pipeline's priority.
    kueue_priority: str = ""


WORK_MOUNT = "/medcritical-work"
GiB = 1024**3
# CPUs per task, and the smallest memory and work volume whatever the plan says (a 7B full fine-tune's
# ZeRO-3 checkpoints: `medcritical plan --recipe recipes/full-zero3-8gpu.yaml`).
CPUS = {"cpu": "4", "train": "16", "infer": "16"}
MIN_MEMORY = {"cpu": 8, "train": 64, "infer": 64}  # GiB
MIN_WORK = {"prepare_data": 20, "distill": 50, "sft": 400, "dpo": 400, "rollout": 100, "evaluate": 100, "report": 10}
# A hung NCCL collective or vLLM engine must not hold GPUs forever; the retries cover lost nodes and
# evictions (a step resumes from its checkpoints when its work folder survived: --work-pvc).
TIMEOUT_S = {"cpu": 4 * 3600, "train": 72 * 3600, "infer": 48 * 3600}
RETRIES = 2
PLAN_STEP = {"prepare_data": "prepare-data"}  # component name -> the plan's (CLI's) step name


def _round_gib(value: float, floor: int) -> int:
    """GiB rounded up to a multiple of 8, at least `floor`."""
    return max(floor, 8 * -(-int(value // GiB + 1) // 8))


def planned_resources(recipe_text: str, cluster: ClusterSettings) -> dict:
    """Memory per kind of task and the work volume of each step, from `medcritical plan` for this recipe
    (its training steps on the recipe's run.train_gpus GPUs). A model of unknown shape is refused (PlanError,
    naming --model-config): sizing a 70B like the minimum would compile tasks that cannot run."""
    from medcritical.orchestration.recipe import load_recipe_text
    from medcritical.platform.plan import plan_steps, quantity

    needs = plan_steps(
        load_recipe_text(recipe_text), model_config=cluster.model_config, teacher_config=cluster.teacher_config
    )
    shm = quantity(cluster.shm_size)
    memory = {
        "train": max(needs[s].host_memory for s in ("sft", "dpo")) + shm,
        "infer": max(needs[s].host_memory for s in ("distill", "rollout", "evaluate")) + shm,
        "cpu": needs["prepare-data"].host_memory,
    }
    return {
        "memory": {kind: f"{_round_gib(value, MIN_MEMORY[kind])}Gi" for kind, value in memory.items()},
        "work": {
            step: f"{_round_gib(needs[PLAN_STEP.get(step, step)].disk if PLAN_STEP.get(step, step) in needs else 0, floor)}Gi"
            for step, floor in MIN_WORK.items()
        },
    }


def configure(
    recipe: str,
    rounds: int,
    overrides: list,
    base_model: str,
    teacher_base_url: str,
    teacher_model: str,
    teacher_on_gpu: bool = True,
    node_selector: dict = {},
    gpu_product: str = "",
    kueue_queue: str = "",
    kueue_priority: str = "",
) -> NamedTuple("Configured", [("recipe", str), ("gpu_node_selector", dict)]):
    """Resolve the recipe once: apply the pipeline's overrides, validate, return the YAML every step reads;
    and the GPU tasks' nodeSelector (`node_selector` with the GPU product), which KFP takes only as one whole
    parameter. A bad GPU product or queue name fails here, before any GPU is requested."""
    from collections import namedtuple

    from medcritical.platform.kfp_runtime import resolve_recipe_text
    from medcritical.platform.scheduling import gpu_node_selector, queue_labels

    queue_labels(kueue_queue, kueue_priority)  # checked
    resolved = resolve_recipe_text(
        recipe, rounds, overrides, base_model, teacher_base_url, teacher_model, teacher_on_gpu=teacher_on_gpu
    )
    return namedtuple("Configured", ["recipe", "gpu_node_selector"])(
        resolved, gpu_node_selector(node_selector, gpu_product)
    )


# Distillation backends that run no model in the pod: the distill task then gets the CPU image and no GPU.
API_TEACHERS = ("openai", "explanations")


def secret_users(recipe) -> dict[tuple, set[str]]:
    """The components that read the teacher's and the judge's endpoint Secrets under this recipe."""
    teacher = set()
    if recipe.distill.backend == "openai":
        teacher.add("distill")
        if recipe.selfplay.corrector == "teacher":  # the teacher-corrected arm calls it from the rollout
            teacher.add("rollout")
    judge = {"evaluate"} if recipe.evaluate.protocol.startswith("judge") else set()
    return {TEACHER_SECRET_KEYS: teacher, JUDGE_SECRET_KEYS: judge}


def default_gpus(recipe) -> dict[str, int]:
    """The GPU parameters' defaults: the recipe's `run.train_gpus` for training (a recipe written for 8
    GPUs says so), the tensor-parallel size of the generation (and of a teacher in the pod) for inference."""
    infer = recipe.generation.tensor_parallel_size
    if recipe.distill.backend in ("vllm", "transformers"):
        infer = max(infer, recipe.distill.local.tensor_parallel_size)
    return {"train": recipe.run.train_gpus, "infer": infer}


# No `from __future__ import annotations` here: KFP reads the components' annotations as types.


def build_pipeline(
    recipe_text: str,
    run_root: str,
    rounds: int = 1,
    cluster: "ClusterSettings | None" = None,
    cache_teacher: bool = False,
):
    """The pipeline function with `rounds` self-play rounds; `cluster` adds the Kubernetes settings.

    `recipe_text` and `run_root` become the defaults of the pipeline's parameters of those names.
    """
    from medcritical.orchestration.recipe import load_recipe_text

    images = (cluster or ClusterSettings()).images
    sized = planned_resources(recipe_text, cluster) if cluster else {"memory": {}, "work": {}}
    parsed = load_recipe_text(recipe_text)
    teacher_on_gpu = parsed.distill.backend not in API_TEACHERS
    secrets = secret_users(parsed)
    gpus = default_gpus(parsed)
    kinds = {func.__name__: _image_kind(func) for func in (prepare_data, distill, sft, rollout, dpo, evaluate, report)}
    if not teacher_on_gpu:
        kinds["distill"] = "cpu"  # an API teacher: no GPU, no vLLM image

    steps = {
        func.__name__: dsl.component(func, base_image=images[kinds[func.__name__]], install_kfp_package=False)
        for func in (prepare_data, distill, sft, rollout, dpo, evaluate, report)
    }
    configure_op = dsl.component(configure, base_image=images["cpu"], install_kfp_package=False)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="MedCritical: teacher distillation + SFT, then self-play self-correction + DPO, evaluated on CMExam.",
    )
    def medcritical(
        recipe: str = recipe_text,
        run_root: str = run_root,
        overrides: list = [],
        base_model: str = "",
        teacher_base_url: str = "",
        teacher_model: str = "",
        # GPU counts are strings: KFP's driver reads an accelerator count as a string value, and a number
        # parameter gives "" (no nvidia.com/gpu limit at all). The plan checks they are whole numbers >= 0.
        train_gpus: str = str(gpus["train"]),
        # Several nodes: the sft and dpo tasks create a Kubeflow Trainer TrainJob of train_nodes x node_gpus
        # GPUs and wait for it (pass train_gpus=0 then: the waiting task needs no GPU).
        train_nodes: int = 1,
        node_gpus: int = 8,
        infer_gpus: str = str(gpus["infer"]),
        accelerator_type: str = "nvidia.com/gpu",
        tolerations: list = [],
        node_selector: dict = {},
        # The GPU tasks' and TrainJobs' nodes by their nvidia.com/gpu.product label, e.g. NVIDIA-H100-80GB-HBM3.
        gpu_product: str = "",
        # The Kueue LocalQueue of the TrainJobs (the GPU tasks' pods: --kueue-queue when compiling).
        kueue_queue: str = (cluster.kueue_queue if cluster else ""),
        # Their Kueue WorkloadPriorityClass (the GPU tasks' pods: --kueue-priority when compiling).
        kueue_priority: str = (cluster.kueue_priority if cluster else ""),
        s3_secret: str = "medcritical-s3",
        teacher_secret: str = "medcritical-teacher",
        judge_secret: str = "medcritical-judge",
        distill_uri: str = "",
        train_memory: str = sized["memory"].get("train", ""),
        infer_memory: str = sized["memory"].get("infer", ""),
    ):
        def on_cluster(task, gpus=None, kind="cpu", component=""):
            """Kubernetes settings for one task (cluster builds only)."""
            if cluster is None:
                return task
            # Requests = limits (Guaranteed QoS: the last pods evicted); memory from the plan, a parameter
            # for the GPU steps since it grows with train_gpus (`medcritical plan --train-gpus N` says how much).
            memory = {"train": train_memory, "infer": infer_memory}.get(kind, sized["memory"]["cpu"])
            task.set_cpu_request(CPUS[kind]).set_cpu_limit(CPUS[kind])
            task.set_memory_request(memory).set_memory_limit(memory)
            kubernetes.set_timeout(task, TIMEOUT_S[kind])
            task.set_retry(RETRIES, backoff_duration="60s")
            if gpus is not None:
                task.set_accelerator_type(accelerator_type).set_accelerator_limit(gpus)
                kubernetes.empty_dir_mount(
                    task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
                )
                # GPU nodes usually carry the nvidia.com/gpu taint (GPU operator, cloud node pools); more
                # tolerations come from the `tolerations` parameter.
                kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
                kubernetes.add_toleration_json(task, tolerations)
                # node_selector with gpu_product, merged by configure (one whole parameter for KFP's driver).
                kubernetes.add_node_selector_json(task, resolved.outputs["gpu_node_selector"])
                for label, value in queue_labels(cluster.kueue_queue, cluster.kueue_priority).items():
                    kubernetes.add_pod_label(task, label, value)
            kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
            if cluster.work_pvc:
                kubernetes.mount_pvc(task, pvc_name=cluster.work_pvc, mount_path=WORK_MOUNT)
            elif component in sized["work"]:
                # Downloads, checkpoints and outputs on an emptyDir of the planned size (writable by the
                # images' UID whatever the node's disk; the kubelet evicts the pod past the limit).
                kubernetes.empty_dir_mount(
                    task, volume_name="work", mount_path=WORK_MOUNT, size_limit=sized["work"][component]
                )
            if cluster.work_pvc or component in sized["work"]:
                task.set_env_variable("MEDCRITICAL_WORKDIR", WORK_MOUNT)
            return task

        def step(component: str, gpus=None, **inputs):
            task = steps[component](recipe=resolved.outputs["recipe"], run_root=run_root, run_id=run_id, **inputs)
            task.set_display_name(inputs["name"])
            if cluster is not None:
                # Only the Secrets this recipe reads, and then required: `optional=True` is honoured only
                # by KFP backends from 2.15.0 (older ones leave the pod in CreateContainerConfigError).
                for secret, keys in ((teacher_secret, TEACHER_SECRET_KEYS), (judge_secret, JUDGE_SECRET_KEYS)):
                    if component in secrets[keys]:
                        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})
            return on_cluster(task, gpus if kinds[component] != "cpu" else None, kinds[component], component)

        # On a cluster every run writes under <run_root>/<run id>: a task's inputs (and so its cache key)
        # then name the very outputs it reads, so a cached task can never pair one run's data with another's
        # model, and two runs sharing run_root never overwrite each other. The run id is an input of its own
        # whose whole value is KFP's placeholder (the driver substitutes it only as a whole value, not inside
        # a longer string); the task joins the path (kfp_runtime.task_root). Locally: the recipe's folder.
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER if cluster is not None else ""
        resolved = on_cluster(
            configure_op(
                recipe=recipe,
                rounds=rounds,
                overrides=overrides,
                base_model=base_model,
                teacher_base_url=teacher_base_url,
                teacher_model=teacher_model,
                teacher_on_gpu=teacher_on_gpu,
                node_selector=node_selector,
                gpu_product=gpu_product,
                kueue_queue=kueue_queue,
                kueue_priority=kueue_priority,
            )
        )
        resolved.set_display_name("configure")
        # Steps hand each other artifacts (Dataset, Model, Metrics) that name their folders under run_root:
        # the KFP UI's lineage shows which data trained which model (medcritical.platform.kfp_runtime, "Lineage").
        # Folder names as every runner caller uses them (staging.stage_folder / eval_folder).
        folder = {name: stage_folder(stage) for name, stage in STAGES.items()}
        data = step("prepare_data", name=folder["prepare_data"]).outputs["data"]
        base_eval = step("evaluate", infer_gpus, name=eval_folder("base"), data=data, label="base")
        # distill_uri: the distill folder of an earlier run; its traces are used and the teacher is not called.
        distilled = step("distill", infer_gpus, name=folder["distill"], data=data, reuse_uri=distill_uri)
        # A teacher endpoint costs money and is not deterministic: never reuse its output unless asked.
        distilled.set_caching_options(cache_teacher)
        multinode = dict(
            train_nodes=train_nodes,
            node_gpus=node_gpus,
            trainjob_image=images["train"],
            s3_secret=s3_secret,
            gpu_product=gpu_product,
            kueue_queue=kueue_queue,
            kueue_priority=kueue_priority,
        )
        # No start_model: SFT trains the recipe's model.base.
        sft = step("sft", train_gpus, name=folder["sft"], traces=distilled.outputs["traces"], **multinode)
        model = sft.outputs["model"]
        sft_eval = step("evaluate", infer_gpus, name=eval_folder("sft"), data=data, model=model, label="sft")
        # The previous round's DPO output: its rounds file holds every round's statistics so far, which the next
        # round's extends and the report shows (none before round 1).
        previous = None
        for round_number in range(1, rounds + 1):
            played = step(
                "rollout", infer_gpus, name=stage_folder(STAGES["rollout"], round_number), data=data, model=model
            )
            trained = step(
                "dpo",
                train_gpus,
                name=stage_folder(STAGES["dpo"], round_number),
                pairs=played.outputs["pairs"],
                start_model=model,
                **({"previous_round": previous} if previous else {}),
                **multinode,
            )
            model = previous = trained.outputs["model"]
        final_eval = step(
            "evaluate",
            infer_gpus,
            name=eval_folder(final_model_label(rounds)),
            data=data,
            model=model,
            label=f"dpo (round {rounds})",
        )
        step(
            "report",
            name=folder["report"],
            base_eval=base_eval.outputs["metrics"],
            sft_eval=sft_eval.outputs["metrics"],
            dpo_eval=final_eval.outputs["metrics"],
            traces=distilled.outputs["traces"],
            **({"last_round": previous} if previous else {}),
        )

    return medcritical


def _image_kind(func) -> str:
    import importlib

    return importlib.import_module(func.__module__).IMAGE
