"""Training metrics: the loss curve, tokens per second, peak memory and steps, as JSON and a PNG plot."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medcritical.analysis.plotting import figure

CURVE_KEYS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy")


class ThroughputCallback(TrainerCallback):
    """Times this session's training and counts its tokens (TRL logs a running `num_tokens` over all ranks);
    logs the last step so the loss curve ends where training did."""

    def __init__(self):
        self.start = self.last_log = None
        self.start_step = 0
        self.tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = self.last_log = time.perf_counter()
        self.start_step = state.global_step  # > 0 when resumed

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_log = True  # so the curve ends at the last step, whatever logging_steps is

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens = int(logs["num_tokens"])
            self.last_log = time.perf_counter()

    @property
    def tokens_per_second(self) -> float | None:
        seconds = (self.last_log or 0) - (self.start or 0)
        return round(self.tokens / seconds, 1) if self.tokens and seconds > 0 else None


def peak_memory() -> dict[str, Any]:
    """Peak GPU memory allocated by torch on this rank, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "peak_memory_of": "cuda"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_gib": round(kib / 2**20, 3), "peak_memory_of": "cpu_rss"}


def loss_curve(log_history: list[dict]) -> list[dict]:
    """One point per logged training step (the history survives resuming: it is kept in each checkpoint)."""
    return [
        {"step": entry["step"], **{k: entry[k] for k in CURVE_KEYS if k in entry}}
        for entry in log_history
        if "loss" in entry and "step" in entry
    ]


def summarize_training(trainer, throughput: ThroughputCallback, *, wall_seconds: float) -> dict[str, Any]:
    curve = loss_curve(trainer.state.log_history)
    return {
        "steps": trainer.state.global_step,
        "steps_this_session": trainer.state.global_step - throughput.start_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "loss_first": curve[0]["loss"] if curve else None,
        "loss_last": curve[-1]["loss"] if curve else None,
        "tokens_this_session": throughput.tokens,
        "tokens_per_second": throughput.tokens_per_second,
        "train_seconds": round(wall_seconds, 2),
        **peak_memory(),
        "world_size": trainer.args.world_size,
        # The batch one optimizer step sees over every rank: the recipe's per-device batch x accumulation on
        # one GPU, whatever the world size (the runner divides the accumulation by it).
        "global_batch": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "loss_curve": curve,
    }


def write_metrics(output_dir: str | Path, step: str, metrics: dict[str, Any]) -> tuple[Path, Path]:
    """`<step>_metrics.json` and `<step>_loss.png` in output_dir."""
    output_dir = Path(output_dir)
    json_path = output_dir / f"{step}_metrics.json"
    json_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str))
    png_path = output_dir / f"{step}_loss.png"
    plot_loss(metrics.get("loss_curve", []), png_path, title=f"{step.upper()} training loss")
    return json_path, png_path


def plot_loss(curve: list[dict], path: str | Path, *, title: str) -> None:
    with figure(path) as (_, ax):
        if curve:
            ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="." if len(curve) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
