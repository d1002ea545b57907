"""End-to-end demo on CPU: `medcritical run` (KFP's local runner, one subprocess per step) against the same steps
called directly in one process (`medcritical.orchestration.runner.run_stage`, same recipe, same order as pipelines/medcritical_pipeline.py).

    python -m benchmarks.pipeline_e2e                         # recipes/demo.yaml, both ways (~2 x the demo's time)
    python -m benchmarks.pipeline_e2e --set selfplay.rounds=2  # recipe overrides, applied to both runs

Per step: wall time and peak resident memory (the KFP run's whole process tree, sampled every 0.2 s). KFP task
times come from its own log lines ("Executing task" ... "finished"), stamped as they arrive; the step's display
name from the "step <name> -> <uri>" line each component logs. Both runs write to fresh folders (steps resume
from what they find, so a shared folder would skip work).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import REPO, MemorySampler, OtherCPUSampler, add_table, finish, new_result, summary_row

TITLE = "1. End-to-end demo on CPU: `medcritical run` (KFP local runner) against direct step calls"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Task start and end as `medcritical run` prints them ("[   12 s] sft ..." / "[   40 s] sft: success"), or as KFP's
# own log lines say it when they reach the console ("Executing task 'sft'" / "Task 'sft' finished with status ...").
EXECUTING = re.compile(r"Executing task '(?P<task>[^']+)'|^\[\s*\d+ s\] (?P<task2>\S+) \.\.\.\s*$")
FINISHED = re.compile(
    r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)"
    r"|^\[\s*\d+ s\] (?P<task2>\S+): (?P<status2>\w+)\s*$"
)
STEP_LINE = re.compile(r"\bstep (\S+) -> ")  # each step logs "step <display name> -> <output uri>"


def direct_plan(recipe, recipe_yaml: str) -> list[tuple[str, Callable[[], object]]]:
    """The pipeline's stages in the pipeline's order and folders, run by the runner in this process."""
    from medcritical.orchestration.runner import STAGES, run_stage
    from medcritical.orchestration.staging import eval_folder, final_model_label, join_uri, stage_folder
    from medcritical.platform.kfp_runtime import resolve_recipe_text

    root, rounds = recipe.run.root, recipe.selfplay.rounds
    stage = STAGES

    def uri(name: str) -> str:
        return join_uri(root, name)

    def run(name: str, folder: str, **given):
        return lambda: run_stage(stage[name], recipe, uri(folder), **given)

    data, distill, sft = (stage_folder(stage[name]) for name in ("prepare_data", "distill", "sft"))
    base_eval, sft_eval, final = eval_folder("base"), eval_folder("sft"), eval_folder(final_model_label(rounds))
    plan = [
        ("configure", lambda: resolve_recipe_text(recipe_yaml, rounds, [], "", "", "")),
        (data, run("prepare_data", data)),
        (base_eval, run("evaluate", base_eval, data=uri(data), label="base")),
        (distill, run("distill", distill, data=uri(data))),
        (sft, run("sft", sft, distill=uri(distill))),
        (sft_eval, run("evaluate", sft_eval, data=uri(data), model=uri(sft), label="sft")),
    ]
    model = uri(sft)
    for r in range(1, rounds + 1):
        rollout, dpo = stage_folder(stage["rollout"], r), stage_folder(stage["dpo"], r)
        plan += [
            (rollout, run("rollout", rollout, data=uri(data), model=model)),
            (dpo, run("dpo", dpo, rollout=uri(rollout), model=model)),
        ]
        model = uri(dpo)
    plan += [
        (final, run("evaluate", final, data=uri(data), model=model, label=f"dpo (round {rounds})")),
        ("report", run("report", "report", base_eval=uri(base_eval), sft_eval=uri(sft_eval), dpo_eval=uri(final))),
    ]
    return plan


def run_direct(recipe, recipe_yaml: str) -> tuple[float, list[dict], float | None]:
    """The steps in this process: total seconds, per-step figures, other processes' CPU seconds meanwhile."""
    import torch

    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)  # what the CLI does with run.threads
    timings = []
    with MemorySampler() as memory, OtherCPUSampler() as others:
        t_start = time.perf_counter()
        for name, call in direct_plan(recipe, recipe_yaml):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            timings.append(
                {
                    "step": name,
                    "s": round(t1 - t0, 2),
                    "peak_rss_gib": memory.peak_gib(t0, t1),
                    "other_cpu_s": others.cpu_s(t0, t1),
                }
            )
            print(f"direct: {name} {t1 - t0:.1f} s", flush=True)
        total = time.perf_counter() - t_start
    return total, timings, others.cpu_s()


def run_kfp(command: list[str], log_path: Path) -> tuple[float, list[dict], int, float | None]:
    """Run `medcritical run`, stamping each output line on arrival: total seconds, per-task figures, exit code,
    other processes' CPU seconds meanwhile."""
    lines: list[tuple[float, str]] = []
    t_start = time.perf_counter()
    # Unbuffered, here and in every step's subprocess: a line must arrive when it is written to be stamped right.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        env=env,
    )
    with MemorySampler(pid=proc.pid) as memory, OtherCPUSampler(pid=proc.pid) as others, log_path.open("w") as log_file:
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))
            log_file.write(line)
        returncode = proc.wait()
    total = time.perf_counter() - t_start
    tasks = parse_tasks(lines)
    for task in tasks:
        start, end = task.pop("start"), task.pop("end")
        task["peak_rss_gib"], task["other_cpu_s"] = memory.peak_gib(start, end), others.cpu_s(start, end)
    return total, tasks, returncode, others.cpu_s()


def parse_tasks(lines: list[tuple[float, str]]) -> list[dict]:
    """Tasks from (arrival time, line) pairs of `medcritical run`'s output: step (display) name, KFP task name,
    status, start, end and seconds."""
    tasks: list[dict] = []
    current: dict | None = None
    for stamp, line in lines:
        line = ANSI.sub("", line).rstrip("\n")
        if m := EXECUTING.search(line):
            task = m["task"] or m["task2"]
            current = {"task": task, "step": task, "start": stamp}
        elif current and (m := STEP_LINE.search(line)):
            current["step"] = m.group(1)
        elif current and (m := FINISHED.search(line)) and (m["task"] or m["task2"]) == current["task"]:
            status = (m["status"] or m["status2"]).lower()
            tasks.append({**current, "status": status, "end": stamp, "s": round(stamp - current["start"], 2)})
            current = None
    return tasks


def same_results(kfp_root: Path, direct_root: Path) -> dict[str, str]:
    """Accuracy of each evaluation, KFP run against direct run: the comparison is fair only if both did the same."""
    compared = {}
    for report in sorted(kfp_root.glob("eval-*/report.json")):
        other = direct_root / report.parent.name / "report.json"
        ours = json.loads(report.read_text())["accuracy"]
        theirs = json.loads(other.read_text())["accuracy"] if other.is_file() else None
        compared[report.parent.name] = (
            f"accuracy {ours:.3f} both ways"
            if ours == theirs
            else f"accuracy {ours:.3f} (KFP) vs {theirs} (direct): runs differ"
        )
    return compared


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both runs (repeatable)",
    )
    parser.add_argument(
        "--no-warm-worker",
        dest="warm",
        action="store_false",
        help="run `medcritical run --no-warm-worker`: every task a fresh Python that imports what it needs itself",
    )
    parser.add_argument("--keep", action="store_true", help="keep both run folders (printed) instead of deleting them")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/pipeline_e2e.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )

    from medcritical.modeling import resolve_model
    from medcritical.modeling.config import TINY
    from medcritical.orchestration.recipe import dump_recipe, load_recipe

    result = new_result("pipeline_e2e", TITLE)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    recipe_path = str(REPO / args.recipe) if not Path(args.recipe).is_absolute() else args.recipe
    direct_recipe = load_recipe(recipe_path, [*args.overrides, f"run.output_dir={work / 'direct'}"])
    if direct_recipe.model.base == TINY:
        resolve_model(TINY, direct_recipe.model.tiny)  # built once here, so neither run pays for it

    cli = Path(sys.executable).parent / "medcritical"
    command = [str(cli)] if cli.is_file() else [sys.executable, "-m", "medcritical.cli"]
    command += [
        "run",
        *([] if args.warm else ["--no-warm-worker"]),
        "--recipe",
        recipe_path,
        *sum((["--set", o] for o in args.overrides), []),
        "--set",
        f"run.output_dir={work / 'kfp'}",
    ]
    print(f"KFP local run: {' '.join(command)}", flush=True)
    kfp_total, kfp_tasks, returncode, kfp_others = run_kfp(command, work / "kfp.log")
    if returncode != 0:
        tail = (work / "kfp.log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(
            f"`medcritical run` failed with exit code {returncode}; last lines:\n"
            + "\n".join(tail)
            + f"\n(full log: {work / 'kfp.log'})"
        )
    direct_total, direct_steps, direct_others = run_direct(direct_recipe, dump_recipe(direct_recipe))

    by_step = {t["step"]: t for t in kfp_tasks}
    rows = []
    for d in direct_steps:
        k = by_step.get(d["step"], {})
        rows.append(
            [
                d["step"],
                k.get("s"),
                d["s"],
                (k["s"] - d["s"]) if k else None,
                k.get("other_cpu_s"),
                d["other_cpu_s"],
                k.get("peak_rss_gib"),
                d["peak_rss_gib"],
            ]
        )
    kfp_task_sum = sum(t["s"] for t in kfp_tasks)
    rows.append(
        [
            "total (whole command / whole loop)",
            kfp_total,
            direct_total,
            kfp_total - direct_total,
            kfp_others,
            direct_others,
            None,
            None,
        ]
    )
    add_table(
        result,
        "Per step: KFP local runner (one subprocess per step) against direct calls in one process",
        [
            "step",
            "KFP task s",
            "direct s",
            "overhead s",
            "other processes' CPU s (KFP)",
            "other processes' CPU s (direct)",
            "KFP peak RSS GiB (process tree)",
            "direct peak RSS GiB (one process)",
        ],
        rows,
    )
    for d in direct_steps:
        if d["step"] in by_step:
            result["summary"].append(
                summary_row(
                    "end-to-end demo",
                    f"step {d['step']}",
                    by_step[d["step"]]["s"],
                    d["s"],
                    "s",
                    ours_label="KFP task",
                    baseline_label="direct call",
                    higher_is_better=False,
                )
            )
    result["summary"].append(
        summary_row(
            "end-to-end demo",
            "whole pipeline, wall",
            round(kfp_total, 1),
            round(direct_total, 1),
            "s",
            ours_label="medcritical run",
            baseline_label="steps called in one process",
            higher_is_better=False,
        )
    )
    tasks = len(kfp_tasks)
    per_task = (
        "each task a fresh Python with KFP's executor and the project's light modules; its stage runs in a fork of "
        "the warm worker, which imported torch, transformers and TRL once, in parallel with the first tasks (the "
        "first stage waits for those imports)"
        if args.warm
        else "each task a fresh Python: the training and generating steps import torch and transformers (and TRL to "
        "train) again, every step the project's modules and KFP's executor"
    )
    result["findings"] += [
        f"`medcritical run{'' if args.warm else ' --no-warm-worker'}` took {kfp_total:.0f} s, the same steps called "
        f"directly {direct_total:.0f} s: the KFP local runner adds {kfp_total - direct_total:.0f} s "
        f"({(kfp_total / direct_total - 1):.0%}), about {(kfp_task_sum - direct_total) / max(tasks, 1):.1f} s per task "
        f"over {tasks} tasks ({per_task}) plus {kfp_total - kfp_task_sum:.0f} s outside the tasks (the "
        "`medcritical run` process's start, whose full recipe check imports torch, transformers and TRL once, the "
        "pipeline compile, report printing).",
    ]
    same = same_results(work / "kfp", work / "direct")
    compared = "; ".join(f"{name}: {verdict}" for name, verdict in same.items())
    result["findings"].append(
        f"Same work both ways? Evaluations of the KFP run against the direct run: {compared}."
        if same
        else "No evaluation results to compare between the two runs."
    )
    result["findings"].append(
        f"Other work on the machine (CPU seconds of processes outside the benchmark): {kfp_others} s during the KFP "
        f"run, {direct_others} s during the direct run. On 2 cores, a step that shared them with other work is slower "
        "for that reason alone: read the per-step overhead beside the per-step other CPU."
    )
    slowest = max(direct_steps, key=lambda d: d["s"])
    result["findings"].append(f"Slowest step: {slowest['step']} ({slowest['s']:.0f} s directly).")
    result["notes"] += [
        f"Recipe {args.recipe}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + " (the whole recipe is in the JSON); the tiny model was built before both runs. KFP run first, then the "
        "direct run, in fresh output folders.",
        "Peak memory of the KFP run is the whole process tree (the `medcritical run` process plus the running "
        "step's subprocess); of the direct run, the one process, which keeps what earlier steps allocated.",
        "Timings on shared cores vary by 10-20% from run to run; compare figures within one run.",
        "The direct run's process had torch, transformers and TRL imported already (building the tiny model, "
        "checking the recipe in full) before its clock started, so none of its steps pays their import time; "
        "`medcritical run`'s total includes its own start-up.",
    ]
    result["raw"] = {
        "kfp_tasks": kfp_tasks,
        "direct_steps": direct_steps,
        "kfp_total_s": round(kfp_total, 2),
        "direct_total_s": round(direct_total, 2),
        "command": command,
        "same_results": same,
        "other_cpu_s": {"kfp": kfp_others, "direct": direct_others},
        "recipe": dump_recipe(direct_recipe),
    }
    if args.keep:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return finish(result, args.output)


if __name__ == "__main__":
    main()
