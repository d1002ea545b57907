"""What the `medcritical` command shows for an error: a UserError is one sentence and exit 2; anything
else, even a ValueError raised inside the package, is a bug: its traceback and exit 1."""

import pytest

import medcritical.cli.common as common
from medcritical.cli import is_user_error, main


def test_a_plain_value_error_raised_inside_the_package_is_a_bug_with_traceback_and_exit_1(monkeypatch, capsys):
    from medcritical.modeling.generation import sample_seeds

    def bug_in_the_package(*args, **kwargs):
        sample_seeds([[{"role": "user", "content": "q"}]], ["a", "b"], seed=0, n=1)  # two keys for one prompt

    monkeypatch.setattr(common, "load_recipe", bug_in_the_package)
    assert main(["evaluate", "--output", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: generate: 2 keys for 1 prompts" in err and "unexpected error" in err
    assert "error: generate" not in err  # not shown as the user's mistake
    assert not is_user_error(ValueError("generate: 2 keys for 1 prompts"))


def test_too_many_unusable_judge_verdicts_is_the_users_to_fix():
    """The message names the judge settings to fix: one sentence and exit 2, not a bug's traceback."""
    from medcritical.evaluation.evaluate import UnusableVerdicts

    error = UnusableVerdicts("evaluate (judge-paper): 2 of 6 judge verdicts are unusable")
    assert is_user_error(error) and isinstance(error, ValueError)


def test_an_unknown_stage_is_named_with_the_declared_stages(capsys):
    """`medcritical stage` takes its names from the declarations (runner.STAGES), not from a copy of them."""
    from medcritical.orchestration.runner import STAGES

    assert main(["stage", "prepare-data", "--output", "x"]) == 2
    err = capsys.readouterr().err
    assert "stage 'prepare-data': no such stage; the stages are " + ", ".join(STAGES) in err


def test_compile_refuses_an_output_kfp_cannot_write_before_compiling(tmp_path, capsys):
    """KFP writes a pipeline with Kubernetes settings only as YAML: a folder or a .json path was a ValueError
    traceback from inside KFP after the whole compile."""
    for output in (f"{tmp_path}/", str(tmp_path / "pipeline.json"), " "):
        with pytest.raises(SystemExit) as exited:
            main(["compile", "--output", output])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "argument --output" in err and "ending in .yaml" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
