"""DPO's held-out pairs at work: the margin and reward accuracy it selects and stops on, the checkpoint it
keeps and why, and their summary and plot."""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from medcritical.analysis.plotting import figure
from medcritical.training.config import DPOSection

MARGIN, ACCURACY = "eval_rewards/margins", "eval_rewards/accuracies"


def selects_on_heldout(config: DPOSection, heldout: bool) -> bool:
    """Whether held-out pairs choose the model (restore_best) or the last step (early stopping)."""
    return heldout and config.evaluations > 1 and (config.restore_best or bool(config.early_stopping_patience))


class FirstEpochHeldout(TrainerCallback):
    """One held-out evaluation when the first epoch ends (unless one just ran, or training ends there and
    the final evaluation covers it). Its reward accuracy is a diagnostic: near 1 after a single pass
    means chosen and rejected are told apart by style or length, not by reasoning."""

    def __init__(self, save: bool):
        self.save = save  # with restore_best every evaluation has its checkpoint

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch is None or abs(state.epoch - 1) > 1e-6 or state.global_step >= state.max_steps:
            return
        if any(MARGIN in e and e.get("step") == state.global_step for e in state.log_history):
            return
        control.should_evaluate = True
        control.should_save = control.should_save or self.save


def first_epoch_heldout(log_history: list[dict], final: dict | None, epochs_trained: float | None) -> dict | None:
    """Held-out reward accuracy and margin at the end of the first epoch (see FirstEpochHeldout)."""
    entry = next((e for e in log_history if MARGIN in e and e.get("epoch", 0) >= 1 - 1e-6), None)
    if entry is None and final is not None and epochs_trained is not None and epochs_trained >= 1 - 1e-6:
        entry = {**final, "epoch": epochs_trained}
    if entry is None:
        return None
    return {
        "epoch": entry.get("epoch"),
        "step": entry.get("step"),
        "reward_accuracy": entry[ACCURACY],
        "margin": entry[MARGIN],
    }


def kept_model(config: DPOSection, state, restored_best: str | None, heldout: bool) -> dict:
    """Which model DPO kept and why, and the training loss it had (loss_last may be a step it never reached)."""
    losses = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
    if restored_best:
        step = int(restored_best.rsplit("-", 1)[-1])
        why = "restore_best: the best held-out margin on the selection half among the checkpoints"
    else:
        step = state.global_step
        why = (
            "early stopping on the selection half's margin, then the last step"
            if state.global_step < state.max_steps
            else "the last step (no selection" + ("" if heldout else ": no held-out pairs") + ")"
        )
    at_or_before = [loss for s, loss in losses if s <= step]
    return {
        "model": restored_best or f"last step ({step})",
        "step": step,
        "why": why,
        "training_loss": at_or_before[-1] if at_or_before else None,
    }


def heldout_summary(
    log_history: list[dict],
    initial: dict | None,
    final: dict | None,
    reported: dict | None = None,
    selection_pairs: int = 0,
    selected: bool = False,
) -> dict | None:
    """The kept model's held-out figures: on the reporting half when the selection half picked it
    (`reported`), else on every held-out pair (nothing was picked on them). The history, best step and the
    kept model's figures on the selection half stay apart under `selection`."""
    if final is None:
        return None
    by_step = {
        e["step"]: {"step": e["step"], "margin": e[MARGIN], "reward_accuracy": e[ACCURACY], "loss": e.get("eval_loss")}
        for e in log_history
        if MARGIN in e
    }
    history = list(by_step.values())
    best = max(history, key=lambda h: h["margin"], default=None)
    shown = reported or final
    return {
        "reward_accuracy": shown[ACCURACY],
        "margin": shown[MARGIN],
        "loss": shown.get("eval_loss"),
        "measured_on": (
            "the reporting half: held-out pairs not used to pick the model"
            if reported
            else "the pairs that picked the model (no reporting half: biased)"
            if selected
            else "every held-out pair (none picked the model)"
        ),
        "selection": {
            "pairs": selection_pairs,
            "reward_accuracy": final[ACCURACY],
            "margin": final[MARGIN],
        },
        "initial_margin": initial[MARGIN] if initial else None,
        "best_margin": best["margin"] if best else None,
        "best_step": best["step"] if best else None,
        "history": history,
    }


def plot_heldout(metrics: dict, path: Path) -> Path:
    history = metrics["heldout"]["history"]
    with figure(path, ncols=2, size=(11, 4)) as (_, (loss_ax, heldout_ax)):
        curve = metrics.get("loss_curve", [])
        loss_ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], ".-", label="train loss")
        if history:
            steps = [h["step"] for h in history]
            loss_ax.plot(steps, [h["loss"] for h in history], "s-", label="held-out loss")
            heldout_ax.plot(steps, [h["margin"] for h in history], "o-", color="tab:red", label="reward margin")
            accuracy_ax = heldout_ax.twinx()
            accuracy_ax.plot(
                steps, [h["reward_accuracy"] for h in history], "s--", color="tab:green", label="reward accuracy"
            )
            accuracy_ax.set_ylim(0, 1)
            accuracy_ax.set_ylabel("reward accuracy")
            accuracy_ax.legend(loc="lower right")
        if metrics.get("stopped_early"):
            heldout_ax.axvline(metrics["stopped_early"], color="gray", linestyle=":", label="early stop")
        if metrics.get("restored_best"):
            heldout_ax.axvline(
                metrics["heldout"]["best_step"], color="tab:red", linestyle="--", linewidth=1, label="best (kept)"
            )
        loss_ax.axhline(math.log(2), color="gray", linestyle=":", linewidth=1)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("DPO loss")
        loss_ax.legend()
        loss_ax.set_title(f"DPO loss ({metrics['loss_type']}, beta {metrics['beta']})")
        heldout_ax.set_xlabel("step")
        heldout_ax.set_ylabel("held-out reward margin")
        heldout_ax.legend(loc="upper left")
        heldout_ax.set_title("held-out pairs")
    return path
