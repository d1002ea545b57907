"""Teacher backends behind one interface: requests in, each reply handed on as it arrives.

- openai: any OpenAI-compatible endpoint (vLLM / SGLang serving QwQ-32B, DeepSeek-R1, ..., or a
  hosted API), through `medcritical.modeling.llm_client.ChatClient`.
- transformers / vllm: a local model through `medcritical.modeling.generation`, batch by batch.
- vllm-server: a vLLM OpenAI server over a local model, started inside the step (`served_teacher`),
  then asked as the openai backend asks an endpoint.
- explanations: no model; the trace is CMExam's own expert explanation followed by the gold answer,
  and the template a fixed generic approach. Offline, free and deterministic (the demo uses it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from medcritical.data.cmexam import Question
from medcritical.distill.config import DistillSection
from medcritical.distill.traces import TEMPLATE, DistillPrompts
from medcritical.errors import InputError
from medcritical.grader import THINK_END
from medcritical.io.fingerprint import model_fingerprint
from medcritical.modeling import resolve_model
from medcritical.modeling.config import GenerationSection
from medcritical.modeling.generation import generation_setup, load_generator, sample_seed
from medcritical.modeling.llm_client import ChatClient, ChatReply, safe_url
from medcritical.modeling.vllm_server import serve_vllm

log = logging.getLogger(__name__)

TEACHER_ENV_PREFIX = "MEDCRITICAL_TEACHER"  # MEDCRITICAL_TEACHER_BASE_URL, MEDCRITICAL_TEACHER_MODEL


@dataclass(frozen=True)
class TeacherRequest:
    question: Question
    kind: str  # TEMPLATE, TRACE or "correction"
    attempt: int  # 1-based, counted per question and kind
    messages: list[dict[str, str]]
    # What the request's seed is drawn from, with the run's seed (`sample_seed`); "" means question, kind
    # and attempt. A corrector names the trajectory and attempt here and numbers its votes in `vote`, so
    # every vote and every attempt samples on its own stream: same-seeded votes would be one vote three times.
    key: str = ""
    vote: int = 0

    @property
    def seed_key(self) -> str:
        key = self.key or f"{self.question.id}#{self.kind}#{self.attempt}"
        return key if self.vote == 0 else f"{key}#vote{self.vote}"


OnReply = Callable[[TeacherRequest, ChatReply], None]


class Teacher(Protocol):
    # What wrote the traces, recorded in the metadata (never a key). "backend" is always there.
    description: dict
    # The same request always gets the same reply, so one attempt per question is enough.
    deterministic: bool

    def complete(
        self, requests: Sequence[TeacherRequest], *, max_new_tokens: int, seed: int, on_reply: OnReply
    ) -> None:
        """Answer every request, calling `on_reply` for each as soon as its reply exists."""
        ...

    def close(self) -> None:
        """Free what the teacher holds (a local model's engine and memory); called by whoever built it."""
        ...


class EndpointTeacher:
    """An OpenAI-compatible endpoint; requests go out concurrently."""

    def __init__(self, client: ChatClient, *, temperature: float, top_p: float):
        self.client, self.temperature, self.top_p = client, temperature, top_p
        # A URL may carry user:password; the metadata must not.
        self.description = {"backend": "openai", "model": client.model, "base_url": safe_url(client.base_url)}
        self.deterministic = False

    def close(self) -> None:
        pass  # each batch opens and closes its own connections

    def probe(self) -> None:
        """One cheap request before the first batch: a dead endpoint or a refused key stops the step here."""
        self.client.probe()

    def raise_if_failed(self) -> None:
        self.client.raise_if_failed("distill")

    def complete(self, requests, *, max_new_tokens, seed, on_reply):
        self.client.chat_many(
            [r.messages for r in requests],
            on_reply=lambda index, reply: on_reply(requests[index], reply),
            desc=f"teacher {requests[0].kind}s" if requests else "",
            # One seed per request (run seed, request key, vote), never one for all: a server honouring
            # `seed` would otherwise answer every vote on the same prompt with the same text.
            request_params=[{"seed": sample_seed(seed, r.seed_key, 0)} for r in requests],
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_new_tokens,
        )


class LocalModelTeacher:
    """A local model (transformers or vLLM generator); replies are handed on after each batch."""

    def __init__(self, generator, *, name: str, backend: str, temperature: float, top_p: float, batch_size: int):
        self.generator, self.temperature, self.top_p, self.batch_size = generator, temperature, top_p, batch_size
        self.description = {"backend": backend, "model": name}
        self.deterministic = temperature == 0

    def close(self) -> None:
        self.generator.close()

    def complete(self, requests, *, max_new_tokens, seed, on_reply):
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            began = time.monotonic()
            outputs = self.generator.generate(
                [r.messages for r in batch],
                n=1,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
                keys=[r.seed_key for r in batch],  # each vote and attempt its own stream, never the batch position
                desc=f"teacher {batch[0].kind}s",
            )
            seconds = (time.monotonic() - began) / len(batch)
            for request, (completion, *_) in zip(batch, outputs):
                finish = "length" if completion.num_tokens >= max_new_tokens else "stop"
                on_reply(
                    request,
                    ChatReply(
                        content=completion.text,
                        finish_reason=finish,
                        completion_tokens=completion.num_tokens,
                        requests=1,
                        latency_s=seconds,
                    ),
                )


class ExplanationTeacher:
    """Traces from the data itself: the expert explanation as reasoning, then the gold answer."""

    deterministic = True

    def __init__(self, prompts: DistillPrompts, max_chars: int | None = None):
        self.template = prompts.explanation_template.text
        self.max_chars = max_chars
        # "model" is part of the resume fingerprint: a rerun with another cut does not mix traces.
        self.description = {
            "backend": "explanations",
            "model": explanations_name(max_chars),
            "source": "the dataset's expert explanations and gold answers",
        }

        self.traces_written = self.without_explanation = 0

    def close(self) -> None:
        pass  # nothing held

    def complete(self, requests, *, max_new_tokens, seed, on_reply):
        for request in requests:
            question = request.question
            if request.kind == TEMPLATE:
                reply = ChatReply(content=self.template, finish_reason="stop")
            elif question.explanation.strip():
                explanation = question.explanation.strip()[: self.max_chars]
                content = f"<think>\n{explanation}\n{THINK_END}\n答案：{question.answer}"
                reply = ChatReply(content=content, finish_reason="stop")
                self.traces_written += 1
            else:
                reply = ChatReply(error="the question has no expert explanation in the data")
                self.without_explanation += 1
            on_reply(request, reply)

    def raise_if_failed(self) -> None:
        """Questions without an explanation are rejected one by one; a file with none at all is the wrong input
        for this teacher, not an empty SFT set to train on."""
        if self.without_explanation and not self.traces_written:
            raise InputError(
                f"none of the {self.without_explanation} questions asked has an expert explanation: "
                "distill.backend 'explanations' writes traces from CMExam's Explanation column; give questions "
                "that carry it (prepare-data keeps it), or use a model teacher (distill.backend openai, "
                "transformers or vllm)"
            )


def explanations_name(max_chars: int | None) -> str:
    return f"explanations cut to {max_chars} characters" if max_chars else "explanations"


def teacher_identity(config: DistillSection, *, device: str = "auto") -> dict:
    """Who answers, as the resume fingerprint records it (backend, model, a local model's weights and the dtype
    it samples in), from the recipe alone: nothing is loaded, no server started, no endpoint asked. The same
    as the `description` of the teacher `build_teacher` makes; a vllm-server teacher is named by its weights."""
    if config.backend == "explanations":
        return {"backend": "explanations", "model": explanations_name(config.explanation_max_chars)}
    if config.backend == "openai":
        return {"backend": "openai", "model": config.openai.model or os.environ.get(f"{TEACHER_ENV_PREFIX}_MODEL")}
    path = _teacher_path(config)
    if config.backend == "vllm-server":
        return {
            "backend": "vllm-server",
            "model": path.name,
            "weights": model_fingerprint(path),
            "dtype": config.server.dtype,
        }
    return {
        "backend": config.backend,
        "model": _local_name(config),
        "weights": model_fingerprint(path),
        "dtype": generation_setup(config.backend, device, config.local.dtype)["dtype"],
    }


def _teacher_path(config: DistillSection) -> Path:
    if not config.teacher_model:
        raise InputError(
            f"distill.backend is {config.backend!r} but distill.teacher_model is not set; give a local "
            "Hugging Face model folder (or 'tiny'), or use distill.backend: openai for a served model"
        )
    return resolve_model(config.teacher_model)


def _local_name(config: DistillSection) -> str:
    return config.teacher_model if config.teacher_model == "tiny" else Path(config.teacher_model).name


def build_teacher(config: DistillSection, prompts: DistillPrompts, *, device: str = "auto") -> Teacher:
    """The teacher the recipe names; local models are loaded here (slow), endpoints are not contacted."""
    if config.backend == "explanations":
        return ExplanationTeacher(prompts, config.explanation_max_chars)
    if config.backend == "openai":
        client = ChatClient.from_section(config.openai, TEACHER_ENV_PREFIX)
        log.info("teacher: %s at %s (%d requests at a time)", client.model, client.base_url, client.concurrency)
        return EndpointTeacher(client, temperature=config.temperature, top_p=config.top_p)
    if config.backend == "vllm-server":
        raise InputError(
            "distill.backend 'vllm-server' starts its server around a whole run: call distill.run.distill, "
            "or enter teachers.served_teacher(config, output_dir) and build the teacher from the config it yields"
        )
    path = _teacher_path(config)
    generation = GenerationSection(
        backend=config.backend,
        batch_size=config.local.batch_size,
        tensor_parallel_size=config.local.tensor_parallel_size,
        gpu_memory_utilization=config.local.gpu_memory_utilization,
    )
    generator = load_generator(path, generation, device=device, dtype=config.local.dtype)
    teacher = LocalModelTeacher(
        generator,
        name=_local_name(config),
        backend=config.backend,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.local.batch_size,
    )
    # The weights, not the folder name: a retrained teacher in the same folder must not resume old replies.
    teacher.description["weights"] = model_fingerprint(path)
    # The dtype "auto" resolves to here: the same seeds sample differently in bf16 and fp32.
    teacher.description["dtype"] = generation_setup(config.backend, device, config.local.dtype)["dtype"]
    return teacher


@contextlib.contextmanager
def served_teacher(config: DistillSection, output_dir: str | Path) -> Iterator[DistillSection]:
    """For distill.backend vllm-server: start a vLLM server over distill.teacher_model (log in
    `output_dir`), yield the config turned into the openai backend pointing at it, stop it on the way
    out (error or not). Other backends pass through unchanged."""
    if config.backend != "vllm-server":
        yield config
        return
    if not config.teacher_model:
        raise InputError(
            "distill.backend is 'vllm-server' but distill.teacher_model is not set; give the local model "
            "folder the server should load (e.g. /models/QwQ-32B)"
        )
    path = resolve_model(config.teacher_model)
    server = config.server
    with serve_vllm(
        path,
        log_path=Path(output_dir) / server.log_file,
        served_name=path.name,
        tensor_parallel_size=server.tensor_parallel_size,
        dtype=server.dtype,
        max_model_len=server.max_model_len,
        extra_args=server.extra_args,
        start_timeout_s=server.start_timeout_s,
    ) as running:
        openai = config.openai.model_copy(update={"base_url": running.base_url, "model": running.model})
        yield config.model_copy(update={"backend": "openai", "openai": openai})
