"""What every benchmark shares: the machine it ran on, peak-memory sampling, per-case subprocesses,
and one result format (JSON, and the markdown that `benchmarks/report.py` renders into BENCHMARKS.md).

A result is a dict:
    benchmark, title, command (reproduces it), started_at, wall_s, status ("ok" | "not_run"),
    machine, summary (rows: step, metric, ours, baseline, speedup, unit, note), tables (title, columns, rows),
    findings (sentences computed from the figures), notes (how to read them), raw (everything measured);
    a "not_run" result has reason, attempted (date) and planned (the figures it would measure) instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NO_GPU = "no CUDA GPU visible"


# -- the machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, load (the cores may be shared), GPU, versions."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    for package in ("transformers", "trl", "peft", "deepspeed", "vllm", "minio", "kfp"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


def describe_machine(machine: dict) -> str:
    gpu = machine.get("gpu")
    where = f"{gpu['count']} x {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "no GPU"
    return (
        f"{machine['cpu']}, {machine['cpu_cores_usable']} cores (load average {machine['load_average_1m']} at start, "
        f"{machine.get('load_average_1m_end', '?')} at end), {machine['memory_gib']} GiB RAM, {where}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
    )


def gpu_benchmark_can_run(tiny: bool, name: str, title: str, reason: str, planned: list[str], output=None) -> bool:
    """GPU benchmarks run on a CUDA GPU, or on CPU in the tiny smoke mode. Without either, the attempt is recorded
    as "not run" (with the figures it would have measured, `planned`) and the caller stops."""
    import torch

    if tiny or torch.cuda.is_available():
        return True
    path = record_not_run(name, title, reason, output, planned=planned)
    print(
        f"benchmarks.{name}: not run: {NO_GPU}. It measures 7B-shaped models on CUDA GPUs: run it on a GPU machine "
        f"(e.g. in the medcritical-train-cuda / -infer-cuda image), or add --tiny for the CPU smoke mode that checks "
        f"the script end to end on the tiny model. Recorded in {path}."
    )
    return False


# -- GPU reference figures (datasheets; MFU and the roofline name the one they used) ----------------------

# name fragment -> (dense bf16 peak FLOP/s, memory bandwidth B/s, what it is); first match wins.
GPU_SPECS = [
    ("H100 PCIe", 756e12, 2.0e12, "H100 PCIe datasheet: 756 TFLOP/s dense bf16, 2.0 TB/s"),
    ("H100 NVL", 835e12, 3.9e12, "H100 NVL datasheet: 835 TFLOP/s dense bf16, 3.9 TB/s"),
    ("H100", 989e12, 3.35e12, "H100 SXM datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s"),
    ("H200", 989e12, 4.8e12, "H200 SXM datasheet: 989 TFLOP/s dense bf16, 4.8 TB/s"),
    ("A100-SXM4-80GB", 312e12, 2.039e12, "A100 80GB SXM datasheet: 312 TFLOP/s dense bf16, 2.04 TB/s"),
    ("A100 80GB PCIe", 312e12, 1.935e12, "A100 80GB PCIe datasheet: 312 TFLOP/s dense bf16, 1.94 TB/s"),
    ("A100", 312e12, 1.555e12, "A100 40GB datasheet: 312 TFLOP/s dense bf16, 1.56 TB/s"),
    ("L40S", 362e12, 0.864e12, "L40S datasheet: 362 TFLOP/s dense bf16, 0.86 TB/s"),
]


def gpu_spec(name: str) -> tuple[float, float, str] | None:
    for fragment, flops, bandwidth, what in GPU_SPECS:
        if fragment.lower() in name.lower():
            return flops, bandwidth, what
    return None


# -- peak memory -----------------------------------------------------------------------------------------


class MemorySampler:
    """Samples the resident memory of a process (this one by default) and, with `children`, of all its
    descendants (KFP steps run as subprocesses) every `interval` seconds in a thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, children: bool = True):
        import psutil

        self.process = psutil.Process(pid or os.getpid())
        self.interval, self.children = interval, children
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total_rss(self) -> int:
        import psutil

        total = 0
        try:
            family = self.process.children(recursive=True) if self.children else []
            for proc in [self.process, *family]:
                with contextlib.suppress(psutil.Error):  # a child that just exited
                    total += proc.memory_info().rss
        except psutil.Error:
            pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._total_rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_gib(self, start: float = float("-inf"), end: float = float("inf")) -> float | None:
        """Largest sample in [start, end], counting the samples just before and after it (a window shorter
        than the interval still gets a figure)."""
        samples = list(self.samples)
        before = [s for s in samples if s[0] < start][-1:]
        after = [s for s in samples if s[0] > end][:1]
        inside = [rss for _, rss in before + [s for s in samples if start <= s[0] <= end] + after]
        return round(max(inside) / 2**30, 3) if inside else None


class OtherCPUSampler:
    """CPU seconds used by every process outside this one and the process tree of `pid` (the machine's other work:
    the cores are shared), summed every `interval` seconds in a thread. A process that starts and ends between two
    samples is missed, so the figure is a lower bound."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[int, float] = {}
        self._total = 0.0
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ours(self) -> set[int]:
        import psutil

        ours = {os.getpid()}
        for root in {os.getpid(), self.pid or os.getpid()}:
            with contextlib.suppress(psutil.Error):
                ours |= {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
        return ours

    def _sample(self) -> None:
        import psutil

        ours = self._ours()
        for proc in psutil.process_iter(["cpu_times", "create_time"]):
            if proc.pid in ours or proc.info["cpu_times"] is None:
                continue
            cpu = proc.info["cpu_times"].user + proc.info["cpu_times"].system
            # A process first seen now counts from zero if it started during the measurement, else from here.
            before = self._seen.get(proc.pid, 0.0 if (proc.info["create_time"] or 0) >= self._started else cpu)
            self._total += max(0.0, cpu - before)
            self._seen[proc.pid] = cpu
        self.samples.append((time.perf_counter(), self._total))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> OtherCPUSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def cpu_s(self, start: float = float("-inf"), end: float = float("inf")) -> float | None:
        """Other processes' CPU seconds between the last sample at or before `start` and the first at or after `end`."""
        samples = list(self.samples)
        if not samples:
            return None
        first = ([s for s in samples if s[0] <= start] or samples[:1])[-1][1]
        last = ([s for s in samples if s[0] >= end] or samples[-1:])[0][1]
        return round(last - first, 1)


# -- per-case subprocesses ----------------------------------------------------------------------------------


def run_case(
    module: str,
    args: list[str],
    *,
    launcher: list[str] | None = None,
    timeout: float | None = None,
    done_file: Path | None = None,
) -> dict:
    """Run `python -m benchmarks.<module> <args> --case-output FILE` in a fresh process and return the JSON it
    wrote. One process per case: its peak memory is its own, and DeepSpeed / vLLM state never leaks between cases.

    With `done_file` (JSONL), a finished case is appended there and a rerun with the same arguments returns it
    without running again (GPU time is scarce: a run cut short resumes where it stopped)."""
    import tempfile

    key = shlex.join([*(launcher or []), module, *args])
    if done_file and done_file.is_file():
        for line in done_file.read_text().splitlines():
            row = json.loads(line)
            if row["key"] == key and row["result"].get("status") == "ok":
                print(f"already measured, reused from {done_file}: {key}", flush=True)
                return row["result"]
    with tempfile.TemporaryDirectory(prefix="bench-case-") as tmp:
        out = Path(tmp) / "case.json"
        cmd = [*(launcher or [sys.executable]), "-m", f"benchmarks.{module}", *args, "--case-output", str(out)]
        print(f"$ {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            return {"status": "failed", "returncode": proc.returncode, "command": shlex.join(cmd)}
        result = json.loads(out.read_text())
    if done_file:
        with done_file.open("a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


# -- results ------------------------------------------------------------------------------------------------


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def _without_output(argv: list[str]) -> list[str]:
    """The arguments that reproduce a run: where its JSON went is not one of them."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not arg.startswith("--output="):
            kept.append(arg)
    return kept


def new_result(name: str, title: str, module: str | None = None) -> dict[str, Any]:
    """A result named `name` (its JSON file), made by `python -m benchmarks.<module>` (default: the same name)."""
    argv = shlex.join(_without_output(sys.argv[1:]))
    return {
        "benchmark": name,
        "title": title,
        "command": f"python -m benchmarks.{module or name} {argv}".strip(),
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "status": "ok",
        "machine": machine_info(),
        "summary": [],
        "tables": [],
        "findings": [],
        "notes": [],
        "raw": {},
        "_t0": time.perf_counter(),
    }


def summary_row(
    step: str,
    metric: str,
    ours,
    baseline,
    unit: str,
    *,
    ours_label: str,
    baseline_label: str,
    higher_is_better: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """One line of the key table: our figure beside the baseline's, and how many times better ours is."""
    ratio = None
    if isinstance(ours, (int, float)) and isinstance(baseline, (int, float)) and ours and baseline:
        ratio = round(ours / baseline if higher_is_better else baseline / ours, 2)
    return {
        "step": step,
        "metric": metric,
        "ours": ours,
        "ours_label": ours_label,
        "baseline": baseline,
        "baseline_label": baseline_label,
        "unit": unit,
        "speedup": ratio,
        "note": note,
    }


def add_table(result: dict, title: str, columns: list[str], rows: list[list]) -> None:
    result["tables"].append({"title": title, "columns": columns, "rows": rows})


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"  # small costs per sample keep three significant digits
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_COLUMNS = ["step", "metric", "ours", "baseline (same run)", "ours vs baseline", "note"]


def summary_cells(row: dict) -> list:
    unit = f" {row['unit']}" if row["unit"] else ""
    speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "–"
    return [
        row["step"],
        row["metric"],
        f"{fmt(row['ours'])}{unit} ({row['ours_label']})",
        f"{fmt(row['baseline'])}{unit} ({row['baseline_label']})",
        speedup,
        row.get("note", ""),
    ]


def to_markdown(result: dict, heading: str = "##") -> str:
    parts = [f"{heading} {result['title']}", ""]
    parts.append(f"Command: `{result['command']}`  ")
    if result["status"] != "ok":
        parts.append(f"**{result['status'].replace('_', ' ')}**: {result.get('reason', '')}")
        if result.get("planned"):
            parts += ["", "What it measures when run on a GPU machine:", "", *[f"- {p}" for p in result["planned"]]]
        return "\n".join(parts) + "\n"
    parts.append(
        f"Run {result['started_at']} in {fmt(result.get('wall_s'))} s on: {describe_machine(result['machine'])}"
    )
    parts.append("")
    if result["summary"]:
        parts += [markdown_table(SUMMARY_COLUMNS, [summary_cells(r) for r in result["summary"]]), ""]
    for table in result["tables"]:
        parts += [f"**{table['title']}**", "", markdown_table(table["columns"], table["rows"]), ""]
    if result["findings"]:
        parts += ["Findings:", "", *[f"- {line}" for line in result["findings"]], ""]
    if result["notes"]:
        parts += ["Notes:", "", *[f"- {line}" for line in result["notes"]], ""]
    return "\n".join(parts)


def finish(result: dict, output: str | Path | None) -> Path:
    """Stamp the wall time and end load, write the JSON, print the markdown; returns the JSON path."""
    result["wall_s"] = round(time.perf_counter() - result.pop("_t0"), 1)
    result["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    path = Path(output) if output else RESULTS / f"{result['benchmark']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    print("\n" + to_markdown(result))
    print(f"written: {path}")
    return path


def record_not_run(
    name: str, title: str, reason: str, output: str | Path | None = None, planned: list[str] = ()
) -> Path:
    """Mark a benchmark as attempted but not run (e.g. no GPU), keeping earlier real figures if there are any.
    `planned`: the figures it would have measured, listed as "not run" rows in BENCHMARKS.md."""
    path = Path(output) if output else RESULTS / f"{name}.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("status") == "ok":
            previous.setdefault("later_attempts", []).append({"date": today(), "reason": reason})
            path.write_text(json.dumps(previous, indent=2, ensure_ascii=False) + "\n")
            return path
    result = new_result(name, title)
    result.pop("_t0")
    result.update(
        status="not_run", reason=f"{reason} (last attempted {today()})", attempted=today(), planned=list(planned)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    return path
