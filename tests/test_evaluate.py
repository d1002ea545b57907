"""The evaluation step: saved predictions, the tiny model end to end, resume, reports."""

import json

import pytest

from medcritical.cli import main
from medcritical.data.cmexam import write_questions
from medcritical.evaluation.config import EvaluateSection
from medcritical.evaluation.evaluate import evaluate_model
from medcritical.evaluation.metrics import summarize, wilson_interval
from medcritical.io.fingerprint import ResumeMismatch
from medcritical.modeling.config import GenerationSection


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_wilson_interval_known_values():
    low, high = wilson_interval(81, 100)
    assert (round(low, 3), round(high, 3)) == (0.722, 0.875)  # p=0.81: 0.7223-0.8749
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 0) == (0.0, 0.0)


def test_summary_breaks_down_by_answer_type_and_annotations(bundled):
    from dataclasses import replace

    questions = [replace(q, annotations={"Difficulty level": str(i % 2)}) for i, q in enumerate(bundled[:10])]
    summary = summarize("mcq", questions, {q.id: i < 4 for i, q in enumerate(questions)})
    assert summary["protocol"] == "mcq" and summary["accuracy"] == 0.4 and summary["n"] == 10
    assert summary["by"]["Difficulty level"]["0"]["correct"] == 2
    assert sum(cell["n"] for cell in summary["by"]["answer_type"].values()) == 10


def test_cli_scores_saved_predictions(tmp_path, bundled, capsys):
    questions = bundled[:6]
    dataset = tmp_path / "eval.jsonl"
    write_questions(questions, dataset)
    predictions = tmp_path / "preds.jsonl"
    rows = [
        {"id": questions[0].id, "output": f"<think>A? B?</think>答案：{questions[0].answer}"},  # right
        {"id": questions[1].id, "output": "答案：" + ("A" if questions[1].answer != "A" else "B")},  # wrong
        {"id": questions[2].id, "output": "I cannot tell."},  # no answer: wrong
        {"id": "not-a-question", "output": "答案：A"},  # unknown id: reported, ignored
        *({"id": q.id, "output": f"正确答案为{q.answer}"} for q in questions[3:5]),  # right
        # questions[5] has no prediction: reported, counted wrong
    ]
    predictions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--dataset", str(dataset), "--predictions", str(predictions), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["protocol"], report["n"], report["correct"]) == ("mcq", 6, 3)
    assert report["accuracy"] == 0.5
    assert report["unknown_ids"] == ["not-a-question"] and report["missing_predictions"] == [questions[5].id]
    graded = {row["id"]: row for row in read_jsonl(out / "graded.jsonl")}
    assert graded[questions[0].id]["predicted"] == questions[0].answer and graded[questions[0].id]["correct"]
    assert graded[questions[2].id]["predicted"] == "" and not graded[questions[2].id]["correct"]
    assert "Accuracy (mcq): 50.0%" in (out / "report.md").read_text()
    assert report["format"]["counts"]["empty"] == 2  # "I cannot tell." and the missing prediction
    assert "Format (mcq): empty 33.3%" in (out / "report.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "CMExam accuracy (mcq): 50.0%" in capsys.readouterr().out


def test_bad_predictions_file_names_the_line(tmp_path, bundled):
    dataset = tmp_path / "eval.jsonl"
    write_questions(bundled[:2], dataset)
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"id": "1", "output": "答案：A"}\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="p.jsonl: line 2: no 'output' key"):
        from medcritical.evaluation.evaluate import score_predictions

        score_predictions(dataset, predictions, tmp_path / "out")


def test_tiny_model_end_to_end_and_resume(tmp_path, tiny_model, bundled):
    questions = bundled[:12]
    generation = GenerationSection(batch_size=8, max_new_tokens=16)
    out = tmp_path / "eval"
    report = evaluate_model(EvaluateSection(), generation, questions, tiny_model, out, device="cpu", label="base")
    assert report["protocol"] == "mcq" and report["n"] == 12 and report["label"] == "base"
    graded = read_jsonl(out / "graded.jsonl")
    assert [row["id"] for row in graded] == [q.id for q in questions]
    assert all(set(row) >= {"id", "predicted", "correct", "output"} for row in graded)
    for name in ("report.json", "report.md", "accuracy.png", "outputs.jsonl"):
        assert (out / name).is_file()

    # Resume: an interrupted evaluation generates only the questions it had not reached.
    before = read_jsonl(out / "outputs.jsonl")
    (out / "outputs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in before[:5]))
    evaluate_model(EvaluateSection(), generation, questions, tiny_model, out, device="cpu")
    after = read_jsonl(out / "outputs.jsonl")
    assert after[:5] == before[:5] and sorted(r["id"] for r in after) == sorted(r["id"] for r in before)

    # Outputs of another setting or question set are never mixed into the same report.
    with pytest.raises(ResumeMismatch, match="generation"):
        evaluate_model(EvaluateSection(), GenerationSection(max_new_tokens=8), questions, tiny_model, out, device="cpu")
    with pytest.raises(ResumeMismatch, match="questions"):
        evaluate_model(EvaluateSection(), generation, bundled[:16], tiny_model, out, device="cpu")


def test_retrained_model_in_the_same_folder_is_refused_and_restart_regrades(tmp_path, tiny_model, bundled):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    questions, generation, out = bundled[:4], GenerationSection(max_new_tokens=8), tmp_path / "eval"
    evaluate_model(EvaluateSection(), generation, questions, model_dir, out, device="cpu")
    (out / "outputs.jsonl").write_text(
        "".join(json.dumps({**row, "output": "stale"}) + "\n" for row in read_jsonl(out / "outputs.jsonl"))
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # "retrain": new weights, same path
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(model_dir)

    with pytest.raises(ResumeMismatch, match="model") as error:
        evaluate_model(EvaluateSection(), generation, questions, model_dir, out, device="cpu")
    assert "--restart" in str(error.value) and "questions" not in str(error.value)
    evaluate_model(EvaluateSection(), generation, questions, model_dir, out, device="cpu", restart=True)
    assert all(row["output"] != "stale" for row in read_jsonl(out / "outputs.jsonl"))
    # The CLI passes --restart through (and without it names the flag).
    dataset = tmp_path / "eval.jsonl"
    write_questions(questions, dataset)
    args = [
        "evaluate",
        "--dataset",
        str(dataset),
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--set",
        "generation.max_new_tokens=4",
        "--set",
        "run.device=cpu",
    ]
    assert main(args) == 2
    assert main(args + ["--restart"]) == 0


def test_answer_candidates_are_every_non_empty_option_set():
    from medcritical.evaluation.evaluate import answer_candidates

    five = answer_candidates("ABCDE")
    assert len(five) == 31 and len(set(five)) == 31 and five[:5] == list("ABCDE") and five[-1] == "ABCDE"
    assert len(answer_candidates("ABCD")) == 15 and answer_candidates("ABCD", "single") == list("ABCD")


def test_loglik_scoring_weighs_every_answer_set_and_never_reads_the_gold(tmp_path, tiny_model, bundled):
    from dataclasses import replace

    from medcritical.evaluation.evaluate import answer_candidates

    questions = [q for q in bundled if q.is_multi_answer][:2] + [q for q in bundled if not q.is_multi_answer][:3]
    config, generation = EvaluateSection(scoring="loglik"), GenerationSection(max_new_tokens=8)
    report = evaluate_model(config, generation, questions, tiny_model, tmp_path / "a", device="cpu")
    assert report["scoring"] == "loglik" and report["format"]["shares"]["answered"] == 1.0
    outputs = {o["id"]: o for o in read_jsonl(tmp_path / "a" / "outputs.jsonl")}
    graded = {row["id"]: row for row in read_jsonl(tmp_path / "a" / "graded.jsonl")}
    for q in questions:
        scores = outputs[q.id]["loglik"]
        assert list(scores) == answer_candidates(q.options) and all(s < 0 for s in scores.values())
        best = max(scores, key=scores.get)
        assert outputs[q.id]["output"] == config.loglik_prefix + best and graded[q.id]["predicted"] == best

    # The same questions with other gold answers: the same scores, the same predictions.
    regolded = [replace(q, answer="A" if q.answer != "A" else "B") for q in questions]
    evaluate_model(config, generation, regolded, tiny_model, tmp_path / "b", device="cpu")
    assert {o["id"]: o["loglik"] for o in read_jsonl(tmp_path / "b" / "outputs.jsonl")} == {
        i: o["loglik"] for i, o in outputs.items()
    }


def test_loglik_scores_the_reply_the_trained_format_would_write(tiny_model, bundled):
    """The candidate score is the log-probability of the whole reply, as a hand-built forward pass gives."""
    import torch

    from medcritical.evaluation.evaluate import loglik_rows
    from medcritical.modeling.generation import TransformersGenerator
    from medcritical.prompts import mcq_messages

    generator = TransformersGenerator(tiny_model, device="cpu", batch_size=4)
    q = next(q for q in bundled if len(q.options) == 4)
    config = EvaluateSection(scoring="loglik", loglik_answers="single")
    (row,) = loglik_rows(generator, [q], config)
    tok = generator.tokenizer
    prompt = generator.encode_prompts([mcq_messages(q)])[0]
    reply = tok.encode(config.loglik_prefix + "B" + tok.eos_token, add_special_tokens=False)
    assert reply[-1] == tok.eos_token_id  # the end of turn is one token, not its spelling
    with torch.no_grad():
        logprobs = generator.model(torch.tensor([prompt + reply])).logits[0].log_softmax(-1)
    expected = sum(logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(reply))
    assert row["loglik"]["B"] == pytest.approx(expected, abs=1e-3)


def test_loglik_on_a_backend_without_scores_fails_before_any_work(monkeypatch):
    from medcritical.evaluation.evaluate import check_loglik_backend
    from medcritical.modeling import generation

    check_loglik_backend("transformers")
    monkeypatch.delattr(generation.VLLMGenerator, "continuation_logprobs", raising=False)
    with pytest.raises(ValueError, match="'vllm' generation backend"):
        check_loglik_backend("vllm")
