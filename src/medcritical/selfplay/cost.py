"""What a rollout step costs: tokens of student and teacher, device seconds, and money per pair.

The paper claims self-correction matches teacher-guided correction "at a lower cost"; these counts
make that a number for any run. Tokens come from the records themselves (each generation records its
prompt and completion tokens), seconds from `timings.jsonl` (one line per finished chunk of work, so
a resumed run adds to what the crashed one spent instead of forgetting it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from medcritical.io.jsonl import append_jsonl, read_jsonl
from medcritical.modeling.generation import Messages

TIMINGS = "timings.jsonl"


def prompt_token_counter(generator):
    """Counts a chat prompt's tokens with the generator's own tokenizer and chat template (None when
    the generator exposes no tokenizer: its prompt tokens are then not counted)."""
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None and hasattr(generator, "llm"):
        tokenizer = generator.llm.get_tokenizer()  # vLLM
    if tokenizer is None:
        return None

    def count(messages: Messages) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(ids["input_ids"])

    return count


def accelerators(device: str, used: int | None = None) -> int:
    """GPUs the step's generation uses (0 on CPU): device-seconds are wall seconds times this, else CPU
    seconds. `used`: how many it runs on (vLLM's tensor_parallel_size; 1 for transformers), never more
    than are visible; without it, every visible GPU."""
    try:
        import torch

        visible = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    except ImportError:
        return 0
    return min(visible, used) if used is not None else visible


@contextlib.contextmanager
def timed(path: str | Path, phase: str) -> Iterator[None]:
    """Append {phase, wall_s, cpu_s} to `path` when the block finishes (not when it fails: a crashed
    chunk is redone, and the redo is what its output cost)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    append_jsonl([{"phase": phase, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}], path)


def _tokens(items: Sequence[dict]) -> dict:
    return {
        "prompt_tokens": sum(i.get("prompt_tokens", 0) for i in items),
        "completion_tokens": sum(i.get("completion_tokens", i.get("num_tokens", 0)) for i in items),
    }


def _add(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def _token_counts(rollouts: Sequence[dict], corrections: Sequence[dict]) -> tuple[dict, dict, dict]:
    """(student, student by phase, teacher) token counts of the rollouts and the corrections."""
    phases: dict[str, dict] = {"rollout": {}, "correction": {}, "rewrite": {}}
    # rollout: the prompt once per question (recorded on sample 0), each sample's completion
    _add(
        phases["rollout"],
        _tokens(
            [
                {
                    "prompt_tokens": r.get("prompt_tokens", 0) if r["sample"] == 0 else 0,
                    "completion_tokens": r["num_tokens"],
                }
                for r in rollouts
            ]
        ),
    )
    teacher: dict = {"prompt_tokens": 0, "completion_tokens": 0}
    for c in corrections:
        for attempt in c["attempts"]:
            votes = _tokens(attempt["votes"])
            _add(teacher if c.get("corrector") == "teacher" else phases["correction"], votes)
            if attempt["rewrite"]:
                _add(phases["rewrite"], _tokens([attempt["rewrite"]]))
    student: dict = {"prompt_tokens": 0, "completion_tokens": 0}
    for part in phases.values():
        _add(
            student,
            {"prompt_tokens": part.get("prompt_tokens", 0), "completion_tokens": part.get("completion_tokens", 0)},
        )
    return student, phases, teacher


def _money(
    teacher: dict,
    device_seconds: float,
    teacher_price_per_million_tokens: float | None,
    device_hour_price: float | None,
    currency: str,
) -> dict | None:
    """Teacher tokens at the API price plus device-hours at `device_hour_price`; None when neither price is set."""
    if teacher_price_per_million_tokens is None and device_hour_price is None:
        return None
    teacher_money = (
        (teacher["prompt_tokens"] + teacher["completion_tokens"]) * (teacher_price_per_million_tokens or 0) / 1e6
    )
    device_money = device_seconds / 3600 * (device_hour_price or 0)
    return {
        "teacher": teacher_money,
        "device": device_money,
        "total": teacher_money + device_money,
        # The user's prices times the counted tokens and seconds: an estimate, in the user's currency.
        "currency": currency,
        "estimate": True,
    }


def _per_correction_pair(
    phases: dict, seconds: dict, teacher: dict, from_corrections: int, *, gpus: int, money, device_hour_price
) -> dict | None:
    """The correction machinery's own cost (votes, rewrites, teacher) over the pairs it produced: the
    figure that compares a self arm with a teacher arm (their rollouts cost the same)."""
    if not from_corrections:
        return None
    correction_only = (
        phases["correction"].get("prompt_tokens", 0)
        + phases["correction"].get("completion_tokens", 0)
        + phases["rewrite"].get("prompt_tokens", 0)
        + phases["rewrite"].get("completion_tokens", 0)
    )
    correction_wall = sum(seconds.get(p, {}).get("wall_s", 0.0) for p in ("correction", "rewrite"))
    correction_cpu = sum(seconds.get(p, {}).get("cpu_s", 0.0) for p in ("correction", "rewrite"))
    correction_device = correction_wall * gpus if gpus else correction_cpu
    per_correction = {
        "student_tokens": correction_only / from_corrections,
        "teacher_tokens": (teacher["prompt_tokens"] + teacher["completion_tokens"]) / from_corrections,
        "device_seconds": correction_device / from_corrections,
    }
    if money:
        correction_money = money["teacher"] + correction_device / 3600 * (device_hour_price or 0)
        per_correction["money"] = correction_money / from_corrections
    return per_correction


def cost_statistics(
    rollouts: Sequence[dict],
    corrections: Sequence[dict],
    pairs: Sequence[dict],
    timings_path: str | Path,
    *,
    gpus: int,
    teacher_price_per_million_tokens: float | None,
    device_hour_price: float | None,
    currency: str = "USD",
) -> dict:
    """Tokens by who generated them and for what, seconds by phase, and all of it per accepted pair.

    Student prompt tokens are counted once per request (the k samples of a question share one prompt);
    teacher prompt tokens once per request sent (an API bills each). Money: teacher tokens at the API
    price, plus device-hours (GPU-hours on GPUs, CPU-hours on CPU) at `device_hour_price`.
    """
    student, phases, teacher = _token_counts(rollouts, corrections)
    seconds: dict[str, dict] = {}
    for line in read_jsonl(timings_path):
        _add(seconds.setdefault(line["phase"], {}), {"wall_s": line["wall_s"], "cpu_s": line["cpu_s"]})
    wall = sum(s["wall_s"] for s in seconds.values())
    cpu = sum(s["cpu_s"] for s in seconds.values())
    device_seconds = wall * gpus if gpus else cpu
    stats = {
        "student": student,
        "student_by_phase": phases,
        "teacher": teacher,
        "seconds": {
            "wall": wall,
            "cpu": cpu,
            "gpus": gpus,
            "device_seconds": device_seconds,
            "device": "gpu" if gpus else "cpu",
            "by_phase": seconds,
        },
    }
    money = _money(teacher, device_seconds, teacher_price_per_million_tokens, device_hour_price, currency)
    stats["money"] = money
    accepted = len(pairs)
    from_corrections = sum(p.get("chosen_source") == "correction" for p in pairs)
    stats["pairs"] = accepted
    stats["pairs_from_corrections"] = from_corrections

    def per(count: int) -> dict | None:
        if not count:
            return None
        row = {
            "student_tokens": (student["prompt_tokens"] + student["completion_tokens"]) / count,
            "teacher_tokens": (teacher["prompt_tokens"] + teacher["completion_tokens"]) / count,
            "device_seconds": device_seconds / count,
        }
        if money:
            row["money"] = money["total"] / count
        return row

    stats["per_pair"] = per(accepted)
    stats["per_correction_pair"] = _per_correction_pair(
        phases, seconds, teacher, from_corrections, gpus=gpus, money=money, device_hour_price=device_hour_price
    )
    return stats
