"""The realmodel tier: real weights and a real tokenizer through the stages on CPU (issue 25).

SmolLM2-135M-Instruct (a Llama with ChatML, a default system prompt its template injects, pad = EOS) goes through
SFT (LoRA), rollout with k samples and self-correction, DPO and evaluation (generate and loglik) with the
project's one runner, as a user's model would. The real Qwen3 tokenizer (with a tiny random Qwen3 model) goes
through SFT formatting and generation of the ``<think>`` template.

Nothing here asserts that a model answers well: what is asserted is what real models break (the template as the
model defines it, where generation stops, padding, LoRA module names, the merged model reloading, the grader
reading what was written). Where a count must be non-zero the situation is built on purpose (DPO pairs are written
from the model's own rollout trajectories against the gold answer in the trained format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcritical.data.bundled import bundled_questions
from medcritical.grader import extract_answer_letters, grade_answer
from medcritical.io.jsonl import read_jsonl
from medcritical.prompts import mcq_messages
from tests.fixtures.real_models import build_qwen3_tiny, smollm2_folder

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (converted once, cached under ~/.cache/medcritical)."""
    return smollm2_folder()


@pytest.fixture(scope="session")
def qwen3_tiny(tmp_path_factory) -> Path:
    """A tiny random Qwen3 model with the real Qwen3 tokenizer and chat template."""
    return build_qwen3_tiny(tmp_path_factory.mktemp("qwen3-tiny") / "model")


LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MAX_NEW_TOKENS = 24
STAGE_FOLDERS = (("prepare_data", "data"), ("distill", "distill"), ("sft", "sft"))
SAMPLES = 2


def _recipe(root: Path, model: Path, **overrides):
    from medcritical.orchestration.recipe import load_recipe_text

    text = f"""
run: {{name: realmodel, output_dir: {root}, seed: 0, device: cpu, threads: 1}}
data: {{source: bundled, eval_size: 3, train_size: 4}}
model: {{base: {model}}}
generation: {{backend: transformers, batch_size: 4, max_new_tokens: {MAX_NEW_TOKENS}}}
evaluate: {{protocol: mcq, scoring: generate, language: zh}}
distill: {{backend: explanations, explanation_max_chars: 30}}
sft:
  lora: {{enabled: true, r: 4, alpha: 8, target_modules: all-linear}}
  trainer: {{max_steps: 2, per_device_train_batch_size: 1, learning_rate: 1.0e-3, max_length: 1024, logging_steps: 1}}
selfplay:
  rollout: {{samples_per_question: {SAMPLES}, temperature: 0.8, max_new_tokens: {MAX_NEW_TOKENS}}}
  correction: {{attempts: 1, votes: 1, temperature: 0.8}}
  dpo:
    lora: {{enabled: true, r: 4, alpha: 8}}
    evaluations: 1
    trainer: {{max_steps: 2, per_device_train_batch_size: 1, gradient_accumulation_steps: 1, max_length: 1024, logging_steps: 1}}
"""
    return load_recipe_text(text, [f"{k}={v}" for k, v in overrides.items()])


def _run(stage_name: str, recipe, folder: Path, **inputs) -> dict:
    from medcritical.orchestration.runner import STAGES, run_stage

    return run_stage(STAGES[stage_name], recipe, str(folder), **{k: str(v) for k, v in inputs.items()})


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: its own template and tokens


def test_smollm2_prompts_are_the_models_own_template(smollm2):
    """The generator's prompt ids are the model's apply_chat_template, with the default system prompt that
    SmolLM2's template injects written once and a single <|im_start|> opening it (no doubled BOS)."""
    from transformers import AutoTokenizer

    from medcritical.modeling.generation import TransformersGenerator

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [mcq_messages(q) for q in bundled_questions()[:2]]
    generator = TransformersGenerator(smollm2, device="cpu", batch_size=2)
    encoded = generator.encode_prompts(messages)
    for ids, prompt in zip(encoded, messages):
        expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids == list(expected["input_ids"])
        text = tokenizer.decode(ids)
        assert text.count("You are a helpful AI assistant named SmolLM") == 1
        assert text.startswith("<|im_start|>system\n") and ids[1] != ids[0]
        assert text.endswith("<|im_start|>assistant\n")
    # Batched generation pads on the left with a pad token the tokenizer defines.
    assert generator.tokenizer.padding_side == "left" and generator.tokenizer.pad_token_id is not None


def test_smollm2_training_facts(smollm2):
    """The end of turn is <|im_end|>; pad = EOS is replaced by a token SmolLM2 already has; the template has no
    {% generation %} markers and TRL has no training copy, so SFT trains on (prompt, completion) rows."""
    from transformers import AutoTokenizer

    from medcritical.modeling.chat import stop_token_ids
    from medcritical.training.checks import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # as shipped
    facts = check_tokenizer(tokenizer, str(smollm2))
    assert facts.end_of_turn == "<|im_end|>" and facts.prompt_completion
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != facts.end_of_turn_id
    assert stop_token_ids(tokenizer) == [facts.end_of_turn_id]


def test_smollm2_generation_stops_at_its_end_of_turn(smollm2):
    """Greedy replies of the instruct model end at <|im_end|>: counted with it, never past it, and the stop
    token is not in the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcritical.modeling.generation import TransformersGenerator

    prompts = [
        [{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}],
        [{"role": "user", "content": "What is 2 + 2? Reply with the number only."}],
    ]
    generator = TransformersGenerator(smollm2, device="cpu", batch_size=2)
    replies = [c[0] for c in generator.generate(prompts, max_new_tokens=32)]
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    for prompt, reply in zip(prompts, replies):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        with torch.no_grad():  # one prompt alone, no padding: the model's own greedy reply
            out = model.generate(torch.tensor([ids["input_ids"]]), max_new_tokens=32, do_sample=False)
        new = out[0, len(ids["input_ids"]) :].tolist()
        assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.decode(new)
        assert reply.num_tokens == len(new) < 32
        assert reply.text == tokenizer.decode(new, skip_special_tokens=True) and "<|im_end|>" not in reply.text


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory):
    """data -> distill (explanations) -> sft (LoRA) -> rollout (k samples, self-correction) -> dpo on pairs built
    from the rollout -> evaluate (generate, loglik), all through the runner on SmolLM2."""
    root = tmp_path_factory.mktemp("smol-run")
    recipe = _recipe(root, smollm2)
    results = {folder: _run(name, recipe, root / folder) for name, folder in STAGE_FOLDERS}
    results["rollout"] = _run("rollout", recipe, root / "rollout", data=root / "data", model=root / "sft")
    # DPO pairs on purpose: the model's own rollout trajectories (rejected) against the gold answer in the trained
    # format (chosen), so DPO always has pairs whatever the model wrote.
    questions = {q["id"]: q for q in read_jsonl(root / "data" / "train.jsonl")}
    rollouts = list(read_jsonl(root / "rollout" / "rollouts.jsonl"))
    pairs = []
    for record in rollouts[::SAMPLES]:
        question = questions[record["question_id"]]
        pairs.append(
            {
                "prompt": mcq_messages(_question(question)),
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"<think>{question['explanation'][:30]}</think>\n答案：{question['answer']}",
                    }
                ],
                "rejected": [{"role": "assistant", "content": record["trajectory"] or "不知道"}],
                "question_id": question["id"],
            }
        )
    pairs_dir = root / "pairs"
    pairs_dir.mkdir()
    (pairs_dir / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs[1:]))
    (pairs_dir / "pairs_heldout.jsonl").write_text(json.dumps(pairs[0], ensure_ascii=False) + "\n")
    results["pairs"] = pairs
    results["dpo"] = _run("dpo", recipe, root / "dpo", rollout=pairs_dir, model=root / "sft")
    results["eval-generate"] = _run("evaluate", recipe, root / "eval-generate", model=root / "dpo")
    loglik = _recipe(root, smollm2, **{"evaluate.scoring": "loglik", "evaluate.loglik_answers": "single"})
    results["eval-loglik"] = _run("evaluate", loglik, root / "eval-loglik", model=root / "dpo")
    return root, results


def _question(row: dict):
    from medcritical.data.cmexam import Question

    return Question(**{k: row[k] for k in ("id", "question", "options", "answer", "explanation")})


def test_smollm2_sft_with_lora_by_the_models_module_names(smol_run, smollm2):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, results = smol_run
    metrics = results["sft"]
    assert metrics["lora"] and metrics["merged"] and metrics["rows"] == "prompt-completion"
    assert metrics["end_of_turn_token"] == "<|im_end|>" and metrics["pad_token"] == "<|endoftext|>"
    assert metrics["steps"] == 2
    adapter = PeftConfig.from_pretrained(root / "sft" / "adapter")
    assert set(adapter.target_modules) == LLAMA_LINEAR  # "all-linear" found Llama's own names, lm_head left out
    # The merged model reloads in transformers as a plain Llama (no adapter weights left) with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(root / "sft" / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    tokenizer = AutoTokenizer.from_pretrained(root / "sft" / "model")
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == (smollm2 / "chat_template.jinja").read_text()  # the model's own, kept


def test_smollm2_rollout_grades_what_the_model_wrote(smol_run):
    root, results = smol_run
    stats = results["rollout"]
    questions = {q["id"]: q for q in read_jsonl(root / "data" / "train.jsonl")}
    rollouts = list(read_jsonl(root / "rollout" / "rollouts.jsonl"))
    assert len(rollouts) == len(questions) * SAMPLES == stats["rollout"]["samples"]
    for record in rollouts:
        question = questions[record["question_id"]]
        grade = grade_answer(record["trajectory"], question["answer"], question["options"])
        assert record["predicted"] == grade.predicted and record["correct"] == grade.correct
        assert 0 < record["num_tokens"] <= MAX_NEW_TOKENS and "<|im_end|>" not in record["trajectory"]
    # Every wrong trajectory was given to the model to correct (one attempt, one vote each).
    wrong = sum(not r["correct"] for r in rollouts)
    corrections = list(read_jsonl(root / "rollout" / "corrections.jsonl"))
    assert len({(c["question_id"], c["sample"]) for c in corrections}) == wrong


def test_smollm2_dpo_trains_on_its_own_trajectories(smol_run):
    from transformers import AutoModelForCausalLM

    root, results = smol_run
    metrics = results["dpo"]
    assert metrics.get("status") != "skipped" and metrics["steps"] == 2
    assert metrics["train_pairs"] == len(results["pairs"]) - 1 and metrics["heldout_pairs"] == 1
    model = AutoModelForCausalLM.from_pretrained(root / "dpo" / "model")
    assert not [n for n, _ in model.named_parameters() if "lora" in n]


def test_smollm2_evaluation_reads_the_outputs(smol_run):
    root, results = smol_run
    questions = {q["id"]: q for q in read_jsonl(root / "data" / "eval.jsonl")}
    for name in ("eval-generate", "eval-loglik"):
        report = results[name]
        assert report["n"] == len(questions)
        graded = list(read_jsonl(root / name / "graded.jsonl"))
        for row in graded:
            options = questions[row["id"]]["options"]
            assert row["predicted"] == extract_answer_letters(row["output"], options)
    loglik = list(read_jsonl(root / "eval-loglik" / "graded.jsonl"))
    # loglik always states one of the candidates: every question gets an answer.
    assert all(len(row["predicted"]) == 1 for row in loglik)


# ---------------------------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer and its <think> template, with a tiny random Qwen3 model

# A reply whose reasoning mentions another answer: the grader must read only what follows the last </think>.
THINK_REPLY = "<think>答案：B 不对，应选 A</think>\n答案：A"


def _qwen3_conversation() -> list[dict]:
    return [*mcq_messages(bundled_questions()[0]), {"role": "assistant", "content": THINK_REPLY}]


def test_qwen3_template_facts(qwen3_tiny):
    """Qwen3 ends a turn with <|im_end|>, pads with <|endoftext|>, and its generation config stops on both;
    its template (an earlier revision than TRL's copy) has no {% generation %} markers, so SFT takes
    (prompt, completion) rows; rendered, the prompt is a prefix of the conversation (no doubled system prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcritical.modeling.chat import starts_with_prompt, stop_token_ids
    from medcritical.training.checks import check_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tiny)
    facts = check_tokenizer(tokenizer, str(qwen3_tiny))
    assert facts.end_of_turn == "<|im_end|>" and facts.prompt_completion and tokenizer.pad_token == "<|endoftext|>"
    config = AutoModelForCausalLM.from_pretrained(qwen3_tiny).generation_config
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(tokenizer, config) == ids
    assert starts_with_prompt(tokenizer, _qwen3_conversation())
    text = tokenizer.apply_chat_template(_qwen3_conversation(), tokenize=False)
    assert "<|im_start|>system" not in text  # Qwen3 writes no default system prompt
    reply = text.split("<|im_start|>assistant\n")[-1]  # (the mcq prompt itself names <think></think>)
    assert text.count("<|im_start|>assistant") == 1 and reply.count("<think>") == 1
    assert reply == "<think>\n答案：B 不对，应选 A\n</think>\n\n答案：A<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen3_sft(qwen3_tiny, tmp_path_factory):
    """The SFT step on one <think> reply, 40 steps of full fine-tuning: the tiny model then writes it back:
    returns the output folder and the batches the trainer saw."""
    from transformers import TrainerCallback

    from medcritical.training.config import SFTSection
    from medcritical.training.sft import train_sft

    root = tmp_path_factory.mktemp("qwen3-sft")
    dataset = root / "sft.jsonl"
    dataset.write_text(json.dumps({"messages": _qwen3_conversation()}, ensure_ascii=False) + "\n")
    seen: dict = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen["dataset"] = train_dataloader.dataset

    config = SFTSection(
        lora={"enabled": False},
        trainer={
            "max_steps": 40,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 1,
            "max_length": 512,
            "logging_steps": 10,
        },
    )
    metrics = train_sft(config, dataset, qwen3_tiny, root / "out", device="cpu", callbacks=[Capture()])
    return root / "out", metrics, seen["dataset"]


def test_qwen3_sft_rows_are_qwens_own_template(qwen3_sft, qwen3_tiny):
    """What the trainer tokenized is exactly Qwen3's template applied to the conversation, and the loss covers
    the reply from <think> to <|im_end|>, nothing of the prompt."""
    from transformers import AutoTokenizer

    _, metrics, dataset = qwen3_sft
    assert metrics["rows"] == "prompt-completion" and metrics["end_of_turn_token"] == "<|im_end|>"
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tiny)
    expected = tokenizer.apply_chat_template(_qwen3_conversation(), tokenize=True, return_dict=True)["input_ids"]
    row = dataset[0]
    ids, mask = list(row["input_ids"]), [label != -100 for label in row["labels"]]
    # Qwen3's template ends the turn with "<|im_end|>\n"; the trained sequence may stop at <|im_end|>.
    assert ids == list(expected)[: len(ids)] and len(ids) >= len(expected) - 1
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained.startswith("<think>\n答案：B") and trained.rstrip("\n").endswith("答案：A<|im_end|>")
    assert "<|im_start|>" not in trained


def test_qwen3_generation_opens_and_closes_think_and_the_grader_reads_after_it(qwen3_sft):
    """The trained tiny model writes the <think> reply back (it was fitted to it on purpose); <think> and
    </think> survive decoding, generation stops at <|im_end|>, and the grader reads the answer after the last
    </think> (A), not the B inside the reasoning."""
    from medcritical.modeling.generation import TransformersGenerator

    folder, _, _ = qwen3_sft
    question = bundled_questions()[0]
    generator = TransformersGenerator(folder / "model", device="cpu")
    reply = generator.generate([mcq_messages(question)], max_new_tokens=64)[0][0]
    assert reply.text.startswith("<think>") and "</think>" in reply.text, reply.text
    assert reply.num_tokens < 64  # stopped on <|im_end|>
    assert extract_answer_letters(reply.text, question.options) == "A"
    assert extract_answer_letters("<think>答案：B</think>", question.options) == ""


# ---------------------------------------------------------------------------------------------------------------
# vLLM (CPU build, its own venv): the SFT model reloads there, greedy outputs agree, the judge path, Qwen3's parser

VLLM_SCRIPT = """
import json, sys
from pathlib import Path


def main(model, out):
    from medcritical.modeling.config import GenerationSection
    from medcritical.modeling.generation import VLLMGenerator

    prompts = json.loads(Path(out).with_name("prompts.json").read_text())
    generator = VLLMGenerator(model, GenerationSection(backend="vllm", max_new_tokens=MAX), dtype="float32", seed=0)
    greedy = generator.generate(prompts, max_new_tokens=MAX)
    sampled = generator.generate(prompts, n=2, temperature=0.8, max_new_tokens=MAX, seed=1)
    result = {
        "greedy": [[c.text, c.num_tokens] for (c,) in greedy],
        "sampled": [[[c.text, c.num_tokens] for c in samples] for samples in sampled],
        "loglik": generator.continuation_logprobs(prompts, [["答案：A<|im_end|>", "答案：B<|im_end|>"]] * len(prompts)),
    }
    Path(out).write_text(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


@pytest.mark.vllm
def test_smollm2_sft_model_in_vllm_greedy_as_transformers(smol_run, vllm_python, tmp_path):
    """The merged SFT model loads in vLLM; greedy replies are those of the transformers backend, both stop at
    <|im_end|>; k samples come back per prompt; the loglik scores agree to float32 rounding."""
    from medcritical.modeling.generation import TransformersGenerator
    from tests.fixtures.vllm import run_in_vllm

    root, _ = smol_run
    model = root / "sft" / "model"
    prompts = [mcq_messages(q) for q in bundled_questions()[:3]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    script = tmp_path / "vllm_side.py"
    script.write_text(VLLM_SCRIPT.replace("MAX", str(MAX_NEW_TOKENS)))
    run_in_vllm(vllm_python, script, model, tmp_path / "vllm.json")
    vllm_side = json.loads((tmp_path / "vllm.json").read_text())
    generator = TransformersGenerator(model, device="cpu", batch_size=3)
    greedy = [[c.text, c.num_tokens] for (c,) in generator.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)]
    assert vllm_side["greedy"] == greedy
    assert all(len(samples) == 2 for samples in vllm_side["sampled"])
    assert all(0 < n <= MAX_NEW_TOKENS for samples in vllm_side["sampled"] for _, n in samples)
    loglik = generator.continuation_logprobs(prompts, [["答案：A<|im_end|>", "答案：B<|im_end|>"]] * len(prompts))
    for ours, theirs in zip(loglik, vllm_side["loglik"]):
        assert ours == pytest.approx(theirs, abs=1e-2)


@pytest.mark.vllm
def test_smollm2_judge_path_on_a_vllm_server(smol_run, vllm_python, tmp_path):
    """judge-paper with SmolLM2 as the student (transformers) and as the judge (served by vLLM, verdicts held to
    1/2 by structured outputs, so every answer gets a verdict): the judge reads what the student wrote."""
    from medcritical.evaluation.config import EvaluateSection, JudgeSection
    from medcritical.evaluation.evaluate import evaluate_model
    from medcritical.evaluation.judge import JUDGEMENTS_JSONL
    from medcritical.modeling.config import GenerationSection
    from tests.fixtures.vllm import start_vllm_server, stop_vllm_server

    root, _ = smol_run
    model = root / "sft" / "model"
    server = start_vllm_server(vllm_python, model, tmp_path / "judge.log", "--reasoning-parser", "")
    try:
        config = EvaluateSection(
            protocol="judge-paper",
            judge=JudgeSection(base_url=server.base_url, model=server.model, timeout_s=120, max_retries=1),
        )
        questions = bundled_questions()[:2]
        report = evaluate_model(config, GenerationSection(), questions, model, tmp_path / "eval", device="cpu")
    finally:
        stop_vllm_server(server)
    assert (report["n"], report["dropped"]) == (2, 0)
    verdicts = list(read_jsonl(tmp_path / "eval" / JUDGEMENTS_JSONL))
    outputs = {row["id"]: row["output"] for row in read_jsonl(tmp_path / "eval" / "graded.jsonl")}
    assert {v["reply"] for v in verdicts} <= {"1", "2"} and report["correct"] == sum(
        v["reply"] == "1" for v in verdicts
    )
    assert all(outputs[v["id"]] is not None for v in verdicts)


@pytest.mark.vllm
def test_qwen3_reasoning_parser_on_vllm_server(qwen3_sft, vllm_python, tmp_path):
    """The Qwen3 model fitted to the <think> reply, served with vLLM's qwen3 reasoning parser: the reasoning
    comes back apart from the answer, and the grader reads the answer."""
    from openai import OpenAI

    from tests.fixtures.vllm import start_vllm_server, stop_vllm_server

    folder, _, _ = qwen3_sft
    question = bundled_questions()[0]
    server = start_vllm_server(vllm_python, folder / "model", tmp_path / "server.log", "--reasoning-parser", "qwen3")
    try:
        client = OpenAI(base_url=server.base_url, api_key="none")
        reply = client.chat.completions.create(
            model=server.model, messages=mcq_messages(question), temperature=0.0, max_tokens=64
        )
    finally:
        stop_vllm_server(server)
    message = reply.choices[0].message
    reasoning = getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None)
    assert reasoning and "答案：B" in reasoning, message
    assert extract_answer_letters(message.content, question.options) == "A"
    assert reply.choices[0].finish_reason == "stop"
