"""Generation engines side by side on CPU: vLLM's CPU build against transformers `generate`, through the
project's own `Generator.generate` (per-sample seeds included), on the same tiny model, prompts, samples and
lengths; and the distillation teacher's requests per second against a real vLLM OpenAI server.

    python -m benchmarks.engines_cpu                      # both engines + the teacher (~5 min on 2 shared cores)
    python -m benchmarks.engines_cpu --cases transformers vllm
    python -m benchmarks.engines_cpu --vllm-python /path/to/venv/bin/python

Cases (each in its own process; vLLM's run with the vLLM test tier's venv, under ~/.cache/medcritical, with this
checkout on PYTHONPATH: `pytest tests/test_vllm_smoke.py` creates it):
- rollout-shaped: `--rollout-prompts` MCQ prompts x `--samples` samples, temperature 0.8, top-p 0.95, up to
  `--max-new-tokens` tokens; output tokens/s.
- evaluation-shaped: `--eval-prompts` prompts, greedy, up to `--max-new-tokens`; output tokens/s.
- teacher: `--teacher-requests` distillation-sized chat requests (`--teacher-max-tokens` each) to a vLLM OpenAI
  server started by `medcritical.modeling.vllm_server.serve_vllm`, `--concurrency` in flight: through the
  project's teacher (`build_teacher`, distill.backend openai) against plain `openai.AsyncOpenAI` calls.
transformers runs `--batch-size` prompts per call (x samples rows); vLLM schedules everything at once.
The model is the vLLM-shaped tiny Qwen2 (hidden 128, 2 heads of 64, 2 layers, random weights, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, add_table, finish, new_result, run_case, summary_row
from tests.fixtures.vllm import vllm_venv_dir

TITLE = "6. Engines on CPU: vLLM (CPU build) against transformers generate; teacher requests/s against a vLLM server"
ENGINES = ("transformers", "vllm")
CASES = (*ENGINES, "teacher")


def _env() -> None:
    """One thread per process (2 shared cores), vLLM's small KV cache, offline."""
    os.environ.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )


def _prompts(count: int):
    from medcritical.data.bundled import bundled_questions
    from medcritical.prompts import mcq_messages

    pool = bundled_questions()
    questions = [pool[i % len(pool)] for i in range(count)]
    return [mcq_messages(q) for q in questions], [f"{q.id}#{i}" for i, q in enumerate(questions)]


def _timed_generate(generator, prompts, keys, **kwargs) -> dict:
    started = time.perf_counter()
    completions = generator.generate(prompts, keys=keys, **kwargs)
    seconds = time.perf_counter() - started
    tokens = sum(c.num_tokens for samples in completions for c in samples)
    return {
        "samples": sum(map(len, completions)),
        "output_tokens": tokens,
        "s": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1),
    }


def engine_case(engine: str, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from medcritical.modeling.generation import TransformersGenerator, VLLMGenerator
    from medcritical.orchestration.recipe import GenerationSection

    started = time.perf_counter()
    if engine == "transformers":
        generator = TransformersGenerator(args.model_dir, device="cpu", dtype="float32", batch_size=args.batch_size)
    else:
        generator = VLLMGenerator(args.model_dir, GenerationSection(backend="vllm"), dtype="float32", seed=0)
    case = {"engine": engine, "status": "ok", "load_s": round(time.perf_counter() - started, 1)}
    warm, warm_keys = _prompts(2)
    generator.generate(warm, keys=warm_keys, max_new_tokens=4)
    prompts, keys = _prompts(args.rollout_prompts)
    case["rollout"] = _timed_generate(
        generator,
        prompts,
        keys,
        n=args.samples,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=args.max_new_tokens,
        seed=0,
    )
    prompts, keys = _prompts(args.eval_prompts)
    case["eval"] = _timed_generate(generator, prompts, keys, max_new_tokens=args.max_new_tokens)
    return case


def teacher_case(args) -> dict:
    import asyncio

    import openai

    from medcritical.distill.config import DistillSection, OpenAITeacher
    from medcritical.distill.teachers import TeacherRequest, build_teacher
    from medcritical.distill.traces import TRACE, DistillPrompts
    from medcritical.modeling.vllm_server import serve_vllm

    prompts, _ = _prompts(args.teacher_requests)
    from medcritical.data.bundled import bundled_questions

    question = bundled_questions()[0]
    case: dict = {"engine": "teacher", "status": "ok"}
    log_path = Path(args.scratch) / "teacher-server.log"
    started = time.perf_counter()
    with serve_vllm(
        args.model_dir,
        log_path=log_path,
        served_name="tiny",
        max_model_len=2048,
        extra_args=["--reasoning-parser", "deepseek_r1", "--seed", "0"],
    ) as server:
        case["server_start_s"] = round(time.perf_counter() - started, 1)
        config = DistillSection(
            backend="openai",
            max_new_tokens=args.teacher_max_tokens,
            openai=OpenAITeacher(base_url=server.base_url, model=server.model, concurrency=args.concurrency),
        )
        teacher = build_teacher(config, DistillPrompts.load("zh"))
        requests = [TeacherRequest(question, TRACE, 1, p) for p in prompts]
        replies = []
        # Warm-up: the server's first requests compile and allocate.
        teacher.complete(requests[:4], max_new_tokens=8, seed=0, on_reply=lambda r, reply: None)
        t0 = time.perf_counter()
        teacher.complete(
            requests,
            max_new_tokens=args.teacher_max_tokens,
            seed=0,
            on_reply=lambda request, reply: replies.append(reply),
        )
        seconds = time.perf_counter() - t0
        failed = sum(1 for r in replies if r.error)
        tokens = sum(r.completion_tokens or 0 for r in replies)
        case["project"] = {
            "requests": len(replies),
            "failed": failed,
            "s": round(seconds, 2),
            "requests_per_s": round(len(replies) / seconds, 2),
            "output_tokens_per_s": round(tokens / seconds, 1),
        }

        async def plain() -> dict:
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0)
            limit = asyncio.Semaphore(args.concurrency)

            async def one(messages):
                async with limit:
                    reply = await client.chat.completions.create(
                        model=server.model,
                        messages=messages,
                        max_tokens=args.teacher_max_tokens,
                        temperature=0.7,
                        top_p=0.95,
                        seed=0,
                    )
                    return reply.usage.completion_tokens

            await asyncio.gather(*(one(p) for p in prompts[:4]))  # warm-up, as for the project's client
            t0 = time.perf_counter()
            tokens = await asyncio.gather(*(one(p) for p in prompts))
            seconds = time.perf_counter() - t0
            await client.close()
            return {
                "requests": len(tokens),
                "failed": 0,
                "s": round(seconds, 2),
                "requests_per_s": round(len(tokens) / seconds, 2),
                "output_tokens_per_s": round(sum(tokens) / seconds, 1),
            }

        case["plain_sdk"] = asyncio.run(plain())
    return case


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engines_cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--vllm-python",
        default=str(vllm_venv_dir() / "bin" / "python"),
        help="python of a venv with vllm-cpu (default: the vLLM test tier's venv); this checkout is put on PYTHONPATH",
    )
    parser.add_argument("--rollout-prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="transformers: prompts per generate call")
    parser.add_argument("--teacher-requests", type=int, default=64)
    parser.add_argument("--teacher-max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16, help="teacher requests in flight")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/engines_cpu.json)")
    for hidden in ("--case", "--case-output", "--model-dir", "--scratch"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _env()
    if args.case:
        case = teacher_case(args) if args.case == "teacher" else engine_case(args.case, args)
        Path(args.case_output).write_text(json.dumps(case, indent=2))
        return None
    return drive(args)


def drive(args) -> Path:
    from medcritical.modeling.tiny import build_tiny_model
    from medcritical.orchestration.recipe import TinyModelSection

    result = new_result("engines_cpu", TITLE)
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model_dir = build_tiny_model(work / "model", TinyModelSection(hidden_size=128, num_heads=2))
    forwarded = ["--model-dir", str(model_dir), "--scratch", str(work)]
    for key in (
        "rollout_prompts",
        "samples",
        "eval_prompts",
        "max_new_tokens",
        "batch_size",
        "teacher_requests",
        "teacher_max_tokens",
        "concurrency",
    ):
        forwarded += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cases = {}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    for name in args.cases:
        launcher = None if name == "transformers" else [args.vllm_python]
        if launcher and not Path(args.vllm_python).is_file():
            cases[name] = {"status": "not run", "reason": f"no vLLM venv at {args.vllm_python}"}
            continue
        cases[name] = run_case("engines_cpu", ["--case", name, *forwarded], launcher=launcher, timeout=1800)
        print(f"{name}: {cases[name].get('status')}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    rows = [
        [
            name,
            c.get("status"),
            c.get("load_s"),
            c.get("rollout", {}).get("output_tokens_per_s"),
            c.get("rollout", {}).get("s"),
            c.get("eval", {}).get("output_tokens_per_s"),
            c.get("eval", {}).get("s"),
        ]
        for name, c in cases.items()
        if name in ENGINES
    ]
    add_table(
        result,
        "Generation (same model, prompts, samples, lengths; output tokens/s)",
        ["engine", "status", "load s", "rollout tok/s", "rollout s", "evaluation tok/s", "evaluation s"],
        rows,
    )
    ours, base = cases.get("vllm", {}), cases.get("transformers", {})
    shape = f"{args.rollout_prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens"
    result["summary"] += [
        summary_row(
            "generation (CPU, tiny)",
            f"rollout output tokens/s ({shape})",
            ours.get("rollout", {}).get("output_tokens_per_s"),
            base.get("rollout", {}).get("output_tokens_per_s"),
            "tok/s",
            ours_label="vLLM CPU",
            baseline_label="transformers generate",
        ),
        summary_row(
            "generation (CPU, tiny)",
            f"evaluation output tokens/s ({args.eval_prompts} prompts, greedy)",
            ours.get("eval", {}).get("output_tokens_per_s"),
            base.get("eval", {}).get("output_tokens_per_s"),
            "tok/s",
            ours_label="vLLM CPU",
            baseline_label="transformers generate",
        ),
    ]
    teacher = cases.get("teacher", {})
    if teacher.get("status") == "ok":
        add_table(
            result,
            f"Teacher against a vLLM OpenAI server ({args.teacher_requests} requests, "
            f"{args.teacher_max_tokens} max tokens, {args.concurrency} in flight)",
            ["client", "requests", "failed", "s", "requests/s", "output tok/s"],
            [
                [label, t["requests"], t["failed"], t["s"], t["requests_per_s"], t["output_tokens_per_s"]]
                for label, t in (
                    ("project teacher (build_teacher, openai)", teacher["project"]),
                    ("plain openai.AsyncOpenAI", teacher["plain_sdk"]),
                )
            ],
        )
        result["summary"].append(
            summary_row(
                "distill teacher (CPU server)",
                f"requests/s, {args.concurrency} in flight",
                teacher["project"]["requests_per_s"],
                teacher["plain_sdk"]["requests_per_s"],
                "req/s",
                ours_label="project teacher",
                baseline_label="plain openai SDK",
                note=f"server start {teacher.get('server_start_s')} s",
            )
        )
    if ours.get("rollout") and base.get("rollout"):
        rollout = ours["rollout"]["output_tokens_per_s"] / base["rollout"]["output_tokens_per_s"]
        evaluation = ours["eval"]["output_tokens_per_s"] / base["eval"]["output_tokens_per_s"]
        result["findings"].append(
            f"On a 0.5M-parameter model on 2 shared CPU cores, vLLM's CPU build generated {rollout:.2f}x the output "
            f"tokens/s of transformers generate rollout-shaped and {evaluation:.2f}x evaluation-shaped, after a "
            f"{ours.get('load_s')} s engine start (transformers: {base.get('load_s')} s). This says nothing about GPU "
            "speed: vLLM on GPU is not measured here (its CUDA wheel cannot be carried to the lent GPU machine)."
        )
    result["notes"] += [
        "Machine: 2 shared CPU cores with other work running (see the load average); one thread per process. "
        "Figures are noisy (10-30% between runs): compare the engines of one run with each other.",
        "Both engines run the project's Generator.generate with per-sample seeds (vLLM: one seeded request per "
        "sample, chunked prefill off on CPU). Random weights: answers run to the token limit or stop at a random EOS.",
        "The teacher row measures the whole request path (client, server, engine) on a tiny model: on CPU the "
        'engine dominates, so the two clients should be close; a gap is the client\'s overhead. "project teacher" is '
        "distill.backend openai through medcritical.modeling.llm_client as it is in this commit (rerun after a client change).",
    ]
    result["raw"] = {
        "cases": cases,
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "case_output")},
    }
    return finish(result, args.output)


if __name__ == "__main__":
    main()
