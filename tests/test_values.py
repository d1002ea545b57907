"""How figures are written for people (reports, tables, log lines): one formatter, pinned to what was printed."""

import pytest

from medcritical.core.values import number_text, percent
from medcritical.orchestration.report import _numbers


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "n/a"),
        (1234.5, "1234"),
        (-2500.0, "-2500"),
        (999.99, "1000"),
        (0.000123456, "0.0001235"),
        (7, "7"),
        ("x", "x"),
        (True, "True"),
        (float("nan"), "nan"),
    ],
)
def test_a_log_line_figure(value, text):
    # What training.metrics.short wrote in the SFT and DPO log lines.
    assert number_text(value) == text


def test_an_arms_table_cell():
    # What arms._num wrote: three significant digits, "-" for a missing figure.
    assert [number_text(v, digits=3, missing="-") for v in (None, 999.99, 1234.5, 0.000123456, 77)] == [
        "-",
        "1e+03",
        "1234",
        "0.000123",
        "77",
    ]


def test_a_share_in_percent():
    assert [percent(s) for s in (0, 0.4234, 0.42351, 1, 0.0005)] == ["0.0", "42.3", "42.4", "100.0", "0.1"]


def test_the_run_reports_step_figures():
    stats = {"a": 1234.5, "b": 0.000123456, "c": 7, "d": {"e": 3.14159, "f": None}, "heldout": {"margin": 12.3456}}
    keys = ("a", "b", "c", "d.e", "d.f", "heldout.margin", "missing", "d.e.g")
    assert _numbers(stats, keys) == "a=1234, b=0.0001235, c=7, e=3.142, heldout_margin=12.35"
    assert _numbers({"s": "x", "t": True}, ("s", "t")) == "s=x, t=True"
    assert _numbers(None, ("a",)) == "not run" and _numbers({"x": 1}, ("a",)) == "-"
    assert _numbers({"status": "skipped"}, ("a",)) == "skipped (no reason given)"


def test_one_assignment_parser_for_every_name_value_option():
    from medcritical.core.values import assignment
    from medcritical.errors import InputError
    from medcritical.orchestration.recipe import RecipeError

    assert assignment(" sft.lora.r =16", option="--set", form="key.sub=value", example="sft.lora.r=16") == (
        "sft.lora.r",
        "16",
    )
    assert assignment("note=a=b", option="--param", form="NAME=VALUE", example="x=1") == ("note", "a=b")
    for bad in ("no-equals", "=value", "  =value"):
        with pytest.raises(InputError, match=r"--input .*expected NAME=URI, e\.g\. --input data=runs/x"):
            assignment(bad, option="--input", form="NAME=URI", example="data=runs/x")
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        assignment("oops", option="--set", form="key.sub=value", example="a.b=1", error=RecipeError)
