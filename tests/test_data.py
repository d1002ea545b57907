"""CMExam loading in each format, bad rows, splits and leakage."""

import csv
import json
import re
from pathlib import Path

import openpyxl
import pytest

from medcritical.data.cmexam import DataError, load_questions, parse_options
from medcritical.data.config import DataSection
from medcritical.data.prepare import prepare_data
from medcritical.data.splits import find_leaks, normalize_text, overlapping, split_questions

SHARED_VAL = Path(__file__).resolve().parents[2] / "shared/data/cmexam/val.xlsx"
# The same file seen from a helper worktree (/work/wt/<name>/tests -> /work/shared).
VAL = next(
    (p for p in (SHARED_VAL, Path(__file__).resolve().parents[3] / "shared/data/cmexam/val.xlsx") if p.is_file()),
    SHARED_VAL,
)
HEADER = ["Question", "Options", "Answer", "Explanation"]
ANNOTATIONS = ["Disease Group", "Clinical Department", "Medical Discipline", "Competency", "Difficulty level"]


def write_csv(path, rows, header=HEADER):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_xlsx(path, rows, header=HEADER):
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def test_official_csv_with_real_newlines_and_annotation_columns(tmp_path):
    path = write_csv(
        tmp_path / "test_with_annotations.csv",
        [
            [
                "嘶哑样咳嗽，可见于",
                "A 急性喉炎\nB 声带疾患\nC 百日咳\nD 胸膜炎\nE 支气管扩张",
                "A",
                "解析",
                "呼吸系统疾病",
                "内科",
                "临床医学",
                "医学知识",
                "1",
            ],
            [
                "黄疸伴胆囊增大不会见于",
                "A 胆总管结石\nB 急性肝炎\nC 胰头癌\nD 壶腹癌",
                "BD",
                "",
                "消化系统疾病",
                "外科",
                "临床医学",
                "临床判断",
                "3",
            ],
        ],
        header=HEADER + ANNOTATIONS,
    )
    result = load_questions(path)
    first, second = result.questions
    assert first.id == "0" and second.id == "1"  # 0-based data row numbers when there is no id column
    assert first.options == {"A": "急性喉炎", "B": "声带疾患", "C": "百日咳", "D": "胸膜炎", "E": "支气管扩张"}
    assert second.answer == "BD" and second.is_multi_answer
    assert first.annotations == dict(zip(ANNOTATIONS, ["呼吸系统疾病", "内科", "临床医学", "医学知识", "1"]))
    assert result.bad_rows == []


def test_xlsx_export_with_literal_backslash_n(tmp_path):
    path = write_xlsx(tmp_path / "val.xlsx", [["题目", "A 原发病\\nB 出血部位\\nC 出血量", "C", "出血量决定"]])
    (question,) = load_questions(path).questions
    assert question.options == {"A": "原发病", "B": "出血部位", "C": "出血量"}
    assert question.answer == "C" and question.explanation == "出血量决定"


def test_jsonl_canonical_round_trip_keeps_ids(tmp_path, bundled):
    from medcritical.data.cmexam import write_questions

    path = tmp_path / "q.jsonl"
    write_questions(bundled[:5], path)
    assert load_questions(path).questions == bundled[:5]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["id"] == bundled[0].id and isinstance(rows[0]["options"], dict)


@pytest.mark.parametrize(
    "row,reason",
    [
        (["", "A x\\nB y", "A", ""], "empty question"),
        (["题目", "", "A", ""], "no options"),
        (["题目", "A x\\nB y", "N", ""], "answer letter(s) N not among options AB"),
        (["题目", "A x\\nB y", "", ""], "no answer letter"),
    ],
)
def test_each_bad_row_kind_is_reported_with_file_row_and_reason(tmp_path, row, reason):
    good = ["好题", "A x\\nB y", "B", ""]
    path = write_xlsx(tmp_path / "bad.xlsx", [good, row, good])
    result = load_questions(path, on_bad_row="skip")
    assert [q.id for q in result.questions] == ["0", "2"]  # ids stay the file's row numbers
    (bad,) = result.bad_rows
    assert (bad.file, bad.row, bad.reason) == (str(path), 3, reason)  # the sheet row, header = row 1
    with pytest.raises(DataError, match=rf"bad.xlsx: row 3: {re.escape(reason)}.*on_bad_row"):
        load_questions(path, on_bad_row="error")


def test_duplicate_id_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {"id": "7", "question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}
    path.write_text("\n".join(json.dumps(r) for r in [row, row]) + "\n")
    result = load_questions(path)
    assert len(result.questions) == 1 and "duplicate id '7'" in result.bad_rows[0].reason


def test_unknown_format_and_missing_file_name_the_fix(tmp_path):
    (tmp_path / "q.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown data format '.parquet'"):
        load_questions(tmp_path / "q.parquet")
    with pytest.raises(DataError, match="no such data file"):
        load_questions(tmp_path / "absent.csv")


def test_option_parsing_variants():
    assert parse_options("A. 甲\nB、乙\nC：丙") == {"A": "甲", "B": "乙", "C": "丙"}


@pytest.mark.skipif(not VAL.is_file(), reason="../shared/data/cmexam/val.xlsx not beside the checkout")
def test_real_cmexam_validation_split():
    result = load_questions(VAL)
    # 6,811 rows; one has the answer 'N' (not an option) and is reported, not silently dropped.
    assert len(result.questions) + len(result.bad_rows) == 6811
    assert [(b.row, b.reason) for b in result.bad_rows] == [(5358, "answer letter(s) N not among options ABCDE")]
    assert sum(q.is_multi_answer for q in result.questions) == 210
    assert {len(q.options) for q in result.questions} == {4, 5}


def test_split_is_deterministic_and_independent_of_file_order(bundled):
    train, evaluation = split_questions(bundled, 50, seed=3)
    train2, evaluation2 = split_questions(list(reversed(bundled)), 50, seed=3)
    assert {q.id for q in evaluation} == {q.id for q in evaluation2}
    assert len(train) == 350 and not {q.id for q in train} & {q.id for q in evaluation}
    _, other_seed = split_questions(bundled, 50, seed=4)
    assert {q.id for q in other_seed} != {q.id for q in evaluation}


def test_leakage_check_uses_normalized_text(bundled):
    from dataclasses import replace

    eval_q = bundled[0]
    copy = replace(eval_q, id="copy", question=" " + eval_q.question.replace("，", ",") + "  ")
    assert normalize_text(copy.question) == normalize_text(eval_q.question)
    assert overlapping([copy, bundled[1]], [eval_q]) == [copy]


def test_prepare_data_drops_leaked_training_questions(tmp_path, bundled):
    from medcritical.data.cmexam import write_questions

    source = tmp_path / "train.jsonl"
    evaluation = tmp_path / "eval.jsonl"
    write_questions(bundled[:20], evaluation)
    write_questions(bundled[10:60], source)  # 10 questions overlap with eval (same ids too)
    stats = prepare_data(DataSection(source=str(source), eval_source=str(evaluation), eval_size=0), 0, tmp_path / "out")
    assert stats["train"] == 40 and stats["eval"] == 20 and len(stats["leaked_dropped"]) == 10
    with pytest.raises(DataError, match="10 training questions also appear"):
        prepare_data(
            DataSection(source=str(source), eval_source=str(evaluation), eval_size=0, on_leakage="error"),
            0,
            tmp_path / "o2",
        )
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert stats["leakage"]["exact"] == 10 and len(stats["leakage"]["pairs"]) == 10


def test_full_eval_file_is_not_sampled_when_eval_size_is_null(tmp_path, bundled):
    from medcritical.data.cmexam import write_questions

    write_questions(bundled[:300], tmp_path / "train.jsonl")
    write_questions(bundled[300:], tmp_path / "test.jsonl")
    config = DataSection(source=str(tmp_path / "train.jsonl"), eval_source=str(tmp_path / "test.jsonl"), eval_size=None)
    assert prepare_data(config, 0, tmp_path / "out")["eval"] == 100
    with pytest.raises(DataError, match="eval_size is null but there is no data.eval_source"):
        prepare_data(DataSection(eval_size=None), 0, tmp_path / "o2")


def test_an_eval_size_beyond_the_file_names_the_key_the_count_and_the_fix(tmp_path, bundled):
    from medcritical.data.cmexam import write_questions

    write_questions(bundled[:7], tmp_path / "small.jsonl")
    with pytest.raises(DataError, match=r"data.eval_size is 100, more than the 7 usable questions .*small.jsonl gave"):
        prepare_data(DataSection(source=str(tmp_path / "small.jsonl"), eval_size=100), 0, tmp_path / "out")


def test_near_duplicates_are_caught_and_distinct_questions_are_not(bundled):
    from dataclasses import replace

    e = next(q for q in bundled if len(q.options) == 5 and len(q.question) > 12 and not q.is_multi_answer)
    letters = list(e.options)
    shuffled = dict(zip(letters, reversed(list(e.options.values()))))
    gold_text = e.options[e.answer]
    moved_gold = next(letter for letter, text in shuffled.items() if text == gold_text)
    cases = {
        "shuffled": replace(e, id="shuffled", options=shuffled, answer=moved_gold),  # options in another order
        "spaced": replace(e, id="spaced", question=" ".join(e.question)),  # whitespace everywhere
        "one_char": replace(e, id="one_char", question=e.question[:5] + "某" + e.question[6:]),  # one character edited
        "new_distractors": replace(  # same stem, other wrong options, the same correct one
            e, id="new_distractors", options={l: (t if l == e.answer else f"其他选项{l}") for l, t in e.options.items()}
        ),
        "other_stem": replace(
            e, id="other_stem", question="下列哪一项属于完全不同的另一道考题的题干内容"
        ),  # same options only
        "unrelated": next(
            q for q in bundled if q.id != e.id and normalize_text(q.question) != normalize_text(e.question)
        ),
    }
    found = {leak.train_id: leak.kind for leak in find_leaks(list(cases.values()), [e])}
    assert found == {"shuffled": "exact", "spaced": "exact", "one_char": "near", "new_distractors": "near"}


def _q(qid, stem, options, answer):
    from medcritical.data.cmexam import Question

    return Question(id=qid, question=stem, options=dict(zip("ABCDE", options, strict=False)), answer=answer)


def test_reused_vignettes_and_reordered_paraphrases_are_caught_as_ngram_leaks():
    """Issue 24 item 9: a case vignette re-used with another age, sex or number of days, or re-worded
    with its clauses reordered, keeps difflib's ratio at 0.5-0.77 and passed the near rule. Pairs from
    CMExam val (3414/3416, 4482/4490) and a constructed copy: numbers changed, sex swapped, clauses
    reversed. Templated short stems with the same options ("X的分泌组织是") stay apart."""
    appendicitis = _q(
        "3414",
        "女，35岁。转移性右下腹疼痛5天，伴畏寒、发热2天。查体：T38.5℃，P90次/分，R21次/分。双肺呼吸音清，"
        "未闻及干湿性啰音，心律齐，全腹肌紧张，有明显压痛和反跳痛，麦氏点压痛明显，肠鸣音消失，腹腔穿刺抽出脓性液体，"
        "细菌培养结果最有可能为",
        ["大肠埃希菌", "溶血性链球菌", "铜绿假单胞菌", "金黄色葡萄球菌", "变形杆菌"],
        "A",
    )
    transfusion = _q(
        "4482",
        "成年患者，输血100ml后，突然寒战高热，恶心呕吐，头痛心悸，剧烈腰痛，血压下降等，可诊断为",
        ["发热反应", "过敏反应", "溶血反应", "细菌污染反应", "循环超负荷"],
        "C",
    )
    tissue = _q("6273", "川芎的分泌组织是", ["树脂道", "油管", "油室", "油细胞", "乳汁管"], "C")
    evaluation = [appendicitis, transfusion, tissue]
    train = [
        _q(  # CMExam val 3416: another age, a shorter examination, the same answer in another place
            "3416",
            "女，30岁。转移性右下腹痛5天，加重伴畏寒、发热2天。查体：全腹肌紧张，有明显压痛和反跳痛，麦氏点压痛明显，"
            "肠鸣音消失。腹腔穿刺抽出脓性液体，细菌培养结果最有可能是",
            ["粪链球菌", "铜绿假单胞菌", "变形杆菌", "金黄色葡萄球菌", "大肠埃希菌"],
            "E",
        ),
        _q(  # CMExam val 4490: the symptoms listed in another order
            "4490",
            "成年患者，输血100ml后，突感头痛、恶心、寒战高热、呼吸困难、剧烈腰痛，血压下降，可能发生",
            ["发热反应", "过敏反应", "溶血反应", "空气栓塞", "枸橼酸钠中毒"],
            "C",
        ),
        _q(  # constructed: 男 for 女, 38 for 35, 3 days for 5, the middle clauses reversed
            "copy",
            "男，38岁。细菌培养前腹腔穿刺抽出脓性液体，肠鸣音消失，麦氏点压痛明显，有明显压痛和反跳痛，全腹肌紧张，"
            "心律齐，未闻及干湿性啰音，双肺呼吸音清，查体：T38.5℃，P90次/分，R21次/分。伴畏寒、发热2天，"
            "转移性右下腹疼痛3天。细菌培养结果最有可能为",
            appendicitis.options.values(),
            "A",
        ),
        _q("6285", "白术的分泌组织是", ["树脂道", "油管", "油室", "油细胞", "乳汁管"], "C"),  # same options, other herb
        _q(  # same vignette, another answer asked: not the same item
            "other_answer",
            appendicitis.question.replace("细菌培养结果最有可能为", "首选的治疗是"),
            ["手术", "抗生素", "观察", "补液", "镇痛"],
            "A",
        ),
    ]
    leaks = {leak.train_id: leak for leak in find_leaks(train, evaluation)}
    assert {t: (leak.kind, leak.eval_id) for t, leak in leaks.items()} == {
        "3416": ("ngram", "3414"),
        "4490": ("ngram", "4482"),
        "copy": ("ngram", "3414"),
    }
    assert all(0.4 <= leak.stem_similarity < 1 for leak in leaks.values())


def test_questions_given_straight_to_a_step_are_checked_for_leakage(bundled, tmp_path, caplog):
    """Issue 24 item 9: `distill` / `rollout` / `selfplay --questions FILE` used the file as given, so the
    bundled file passed straight trained on the default recipe's 100 evaluation questions. Now the file
    is checked against the recipe's evaluation questions: leaked ones dropped loudly, or an error; a
    prepare-data folder (checked when made) is used as it is."""
    from medcritical.cli.common import training_questions_uri
    from medcritical.data.cmexam import write_questions
    from medcritical.data.prepare import _split, check_given_questions
    from medcritical.orchestration.recipe import load_recipe

    recipe = load_recipe(None, [])
    evaluation = {q.id for q in _split(recipe.data, recipe.run.seed)[3]}
    given = bundled[:40]
    leaked = [q.id for q in given if q.id in evaluation]
    assert leaked  # the first 40 bundled questions include evaluation questions of the default split
    with caplog.at_level("WARNING"):
        kept = check_given_questions(given, recipe.data, recipe.run.seed, "train.jsonl")
    assert [q.id for q in kept] == [q.id for q in given if q.id not in evaluation]
    assert f"LEAKAGE: {len(leaked)} of the 40 questions in train.jsonl" in caplog.text
    strict = load_recipe(None, ["data.on_leakage=error"])
    with pytest.raises(DataError, match=r"train.jsonl: \d+ of its 40 questions duplicate an evaluation question"):
        check_given_questions(given, strict.data, strict.run.seed, "train.jsonl")

    write_questions(given, tmp_path / "given.jsonl")
    with training_questions_uri(str(tmp_path / "given.jsonl"), recipe) as uri:
        used = load_questions(Path(uri) / "train.jsonl").questions
    assert [q.id for q in used] == [q.id for q in kept]
    prepared = tmp_path / "prepared"
    prepare_data(recipe.data, recipe.run.seed, prepared)
    with training_questions_uri(str(prepared), recipe) as uri:
        assert uri == str(prepared)
    clean = [q for q in given if q.id not in evaluation]
    write_questions(clean, tmp_path / "clean.jsonl")
    with training_questions_uri(str(tmp_path / "clean.jsonl"), recipe) as uri:
        assert uri == str(tmp_path / "clean.jsonl")


@pytest.mark.skipif(not VAL.is_file(), reason="CMExam val.xlsx not in ../shared/data/cmexam")
def test_leakage_check_on_the_real_validation_file():
    """Both halves of CMExam's 6,811-question val file: 2 exact and 13 near duplicates, all genuine
    (same item re-worded, re-ordered or with other distractors). ~3 s on one busy core."""
    questions = load_questions(VAL).questions
    half = len(questions) // 2
    leaks = find_leaks(questions[:half], questions[half:])
    assert sum(leak.kind == "exact" for leak in leaks) == 2 and len(leaks) == 15
    by_id = {q.id: q for q in questions}
    pairs = {(by_id[leak.train_id].question, by_id[leak.eval_id].question) for leak in leaks}
    assert ("风湿性心脏病严重二尖瓣狭窄突发大咯血的原因是", "风湿性心脏病严重二尖瓣狭窄突发大咯血是由于") in pairs
    assert not any(
        "脏是" in a for a, _ in pairs
    )  # 主统血的脏是 / 具有通调水道功能的脏是: same options, other questions


# -- files of every kind and encoding: named problems, bad bytes by row ---------------------------------


ROWS = [
    ["嘶哑样咳嗽，可见于", "A 急性喉炎\nB 声带疾患\nC 百日咳", "A", "解析"],
    ["黄疸伴胆囊增大不会见于", "A 胆总管结石\nB 急性肝炎", "B", ""],
    ["发热伴寒战见于", "A 肺炎\nB 感冒", "A", ""],
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_gb18030_file_is_named_with_its_encoding_and_the_conversion(tmp_path, suffix):
    utf8 = write_csv(tmp_path / "q.csv", ROWS)
    if suffix == ".jsonl":
        from medcritical.data.cmexam import write_questions

        write_questions(load_questions(utf8).questions, tmp_path / "q.jsonl")
    path = tmp_path / f"q{suffix}"
    path.write_bytes(path.read_text(encoding="utf-8").encode("gb18030"))
    with pytest.raises(DataError) as error:
        load_questions(path)
    message = str(error.value)
    assert str(path) in message and "not UTF-8" in message and "looks like GB18030" in message
    assert f"iconv -f GB18030 -t UTF-8 {path} > {tmp_path / ('q.utf8' + suffix)}" in message


def test_stray_bytes_make_only_their_rows_bad(tmp_path):
    path = write_csv(tmp_path / "q.csv", ROWS)
    data = path.read_bytes().replace("百日咳".encode(), b"\xff\xfe")  # inside the first row's quoted options
    path.write_bytes(data)
    result = load_questions(path)
    assert [q.id for q in result.questions] == ["1", "2"]  # ids (row numbers) unchanged
    (bad,) = result.bad_rows
    assert (
        bad.row == 2 and "line 4 is not UTF-8 (byte b'\\xff' at column 3)" in bad.reason
    )  # the record starts on line 2
    with pytest.raises(DataError, match=r"line 2: line 4 is not UTF-8 .*fix the bytes or delete the line.*on_bad_row"):
        load_questions(path, on_bad_row="error")

    jsonl = tmp_path / "q.jsonl"
    lines = [
        json.dumps({"question": q, "options": {"A": "x", "B": "y"}, "answer": "A"}, ensure_ascii=False).encode()
        for q, *_ in ROWS
    ]
    lines[1] = lines[1].replace("黄".encode(), b"\x80")
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    result = load_questions(jsonl)
    assert [q.id for q in result.questions] == ["0", "2"] and "line 2 is not UTF-8" in result.bad_rows[0].reason


@pytest.mark.parametrize(
    "content, hint",
    [
        ("Question,Options,Answer\n题目,A x,A\n".encode(), "looks like text: if it is CSV, rename it to .csv"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), "old .xls workbook: save it as .xlsx"),
    ],
)
def test_an_xlsx_that_is_not_a_workbook_is_named(tmp_path, content, hint):
    path = tmp_path / "val.xlsx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: not an Excel workbook .*{re.escape(hint)}"):
        load_questions(path)


@pytest.mark.parametrize("writer, suffix", [(write_csv, ".csv"), (write_xlsx, ".xlsx")])
def test_a_missing_column_is_named_as_such(tmp_path, writer, suffix):
    path = writer(
        tmp_path / f"q{suffix}", [row[:2] + row[3:] for row in ROWS], header=["Question", "Options", "Explanation"]
    )
    with pytest.raises(DataError, match=r"no 'Answer' column \(found: 'Question', 'Options', 'Explanation'\).*rename"):
        load_questions(path)
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"question": "题目", "options": {"A": "x"}}, ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=r"no 'answer' field \(the Answer column\)"):
        load_questions(jsonl, on_bad_row="error")
