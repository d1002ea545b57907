"""The vLLM backend's checks, run by tests/test_vllm_backend.py with the vLLM venv's python:

    python tests/vllm_scripts/backend_checks.py MODEL_DIR WORK_DIR   # writes WORK_DIR/vllm.json

One engine load for all of them (vLLM's engine core is a spawned process, hence the __main__ guard);
`distill.backend: vllm` goes through `build_teacher` -> `load_generator`, which here hands back the
same engine. The pytest side runs the transformers backend on the same model and compares.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import psutil
from checks_common import (
    SAMPLING,
    correction_config,
    distill_config,
    evaluation_configs,
    questions,
    rollout_config,
)


def texts(completions):
    return [[c.text for c in samples] for samples in completions]


def engine_processes() -> dict:
    """The live vLLM engine processes under this one (EngineCore, Worker), with their names."""
    named = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # short-lived helpers come and go
            # A stopped engine's process stays a zombie until its parent next reaps children: not alive.
            if process.status() != psutil.STATUS_ZOMBIE and (name := process.name()).startswith("VLLM::"):
                named[process] = name
    return named


def main(model: Path, work: Path) -> dict:
    import medcritical.modeling.generation as generation
    from medcritical.distill.run import distill
    from medcritical.evaluation import evaluate
    from medcritical.modeling.config import GenerationSection
    from medcritical.modeling.generation import VLLMGenerator
    from medcritical.prompts import mcq_messages
    from medcritical.selfplay.correction import correct_trajectories
    from medcritical.selfplay.rollout import rollout_questions, rollout_statistics

    generator = VLLMGenerator(model, GenerationSection(backend="vllm"), dtype="float32", seed=0)
    own = engine_processes()  # this generator's engine (core and worker)
    generation.load_generator = lambda *args, **kwargs: generator  # one engine per script (see above)
    pool = questions()
    prompts, keys = [mcq_messages(q) for q in pool[:6]], [q.id for q in pool[:6]]
    out: dict = {}

    # Seeds: batch composition, order and neighbours do not change a sample.
    out["together"] = texts(generator.generate(prompts, keys=keys, seed=3, **SAMPLING))
    out["reversed"] = texts(generator.generate(prompts[::-1], keys=keys[::-1], seed=3, **SAMPLING))[::-1]
    out["alone"] = [
        texts(generator.generate([p], keys=[k], seed=3, **SAMPLING))[0] for p, k in zip(prompts[:2], keys[:2])
    ]
    out["other_seed"] = texts(generator.generate(prompts, keys=keys, seed=4, **SAMPLING))

    # Rollout (k samples) and corrections; a split run resumed against an uninterrupted one.
    config = rollout_config()
    whole = rollout_questions(generator, pool[:5], config, work / "whole.jsonl", seed=7)
    rollout_questions(generator, pool[3:5], config.model_copy(update={"chunk_size": 1}), work / "split.jsonl", seed=7)
    split = rollout_questions(
        generator, pool[:5], config.model_copy(update={"chunk_size": 2}), work / "split.jsonl", seed=7
    )
    out["rollout"] = {"whole": whole, "split": split, "stats": rollout_statistics(whole, config.max_new_tokens)}
    out["corrections"] = correct_trajectories(
        generator,
        {q.id: q for q in pool[:5]},
        whole,
        correction_config(),
        work / "corrections.jsonl",
        max_new_tokens=config.max_new_tokens,
        seed=7,
        chunk_size=4,
    )

    # Evaluation: greedy generation, and loglik through prompt_logprobs.
    out["evaluation"] = {}
    for name, (eval_config, gen_config) in evaluation_configs("vllm").items():
        if name == "loglik" and not hasattr(evaluate, "loglik_rows"):
            continue  # the gold-free loglik scoring (continuation_logprobs) is not in this checkout's evaluation
        report = evaluate.evaluate_model(
            eval_config, gen_config, pool, model, work / f"eval-{name}", generator=generator
        )
        outputs = [json.loads(line) for line in (work / f"eval-{name}" / "outputs.jsonl").read_text().splitlines()]
        out["evaluation"][name] = {"report": report, "outputs": outputs}
    from checks_common import CONTINUATIONS

    out["continuation_logprobs"] = generator.continuation_logprobs(prompts[:4], [CONTINUATIONS] * 4)

    # Distillation with distill.backend: vllm; a rerun resumes and asks nothing.
    stats = distill(distill_config("vllm", str(model)), pool[:4], work / "distill", seed=0)
    rerun = distill(distill_config("vllm", str(model)), pool[:4], work / "distill", seed=0)
    sft = [json.loads(line) for line in (work / "distill" / "sft.jsonl").read_text().splitlines()]
    out["distill"] = {"stats": stats, "rerun": rerun, "sft": sft}

    # Closing stops an engine's processes now: distill closed the teachers' engines it loaded (their processes end
    # within the wait), and closing the checks' own generator ends its engine.
    teachers = {p: name for p, name in engine_processes().items() if p not in own}
    _, teachers_alive = psutil.wait_procs(list(teachers), timeout=60)
    generator.close()
    _, own_alive = psutil.wait_procs(list(own), timeout=60)
    out["engine_processes"] = {
        "own": sorted(own.values()),
        "teachers_alive": sorted(teachers[p] for p in teachers_alive),
        "own_alive_after_close": sorted(own[p] for p in own_alive),
    }
    return out


if __name__ == "__main__":
    model, work = Path(sys.argv[1]), Path(sys.argv[2])
    result = main(model, work)
    (work / "vllm.json").write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str))
