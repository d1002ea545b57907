"""How `medcritical run` ends when a task cannot go on: the task's own sentence and exit 2 for what the user
fixes, as when the step runs on its own, never "unexpected error ... please report" for a missing setting."""

from medcritical.cli import main
from medcritical.platform.local_run import failed_task_error

# KFP's local runner's own words (ANSI colours included) and the end of a task's log, as `medcritical run`
# wrote them for a prepare-data task whose S3 endpoint was not set.
RUNNER = "Pipeline \x1b[95m'medcritical'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. Inner task failed: \x1b[96m'prepare-data'\x1b[0m."
TASK_LOG = """\
    [KFP Executor 2026-12-07 18:09:34,149 INFO]: step data -> s3://bucket/x/data
        Traceback (most recent call last):
      File "/work/main/src/medcritical/storage/client.py", line 61, in from_env
        raise StorageConfigError(
    medcritical.storage.errors.StorageConfigError: s3://bucket/x/data: MEDCRITICAL_S3_ENDPOINT is not set; set it

18:09:34.511 - ERROR - Task \x1b[96m'prepare-data'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_a_tasks_user_error_becomes_the_runs_user_error_naming_the_task():
    error = failed_task_error(RUNNER, TASK_LOG)
    assert str(error) == "task 'prepare-data' failed: s3://bucket/x/data: MEDCRITICAL_S3_ENDPOINT is not set; set it"


def test_a_tasks_bug_keeps_its_traceback():
    """A ValueError (or any error outside the project's UserErrors) is a bug: not turned into a user's mistake."""
    for last in ("    ValueError: generate: 2 keys for 1 prompts", "    medcritical.grader.NoSuchThing: x", ""):
        assert failed_task_error(RUNNER, TASK_LOG.replace(TASK_LOG.splitlines()[4], last)) is None
    assert failed_task_error("some other failure", TASK_LOG) is None


def test_an_s3_run_root_without_settings_stops_before_any_task(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MEDCRITICAL_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", "run.output_dir=s3://bucket/x"]) == 2
    out, err = capsys.readouterr()
    assert "s3://bucket/x: MEDCRITICAL_S3_ENDPOINT is not set" in err and "Traceback" not in err
    assert "configure" not in out + err  # no task ran


def test_a_user_error_raised_in_the_warm_workers_fork_ends_the_run_as_one_sentence(tmp_path, capsys):
    """The real run: prepare-data (run in a fork of the warm worker) meets a file without questions."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bad": 1}\n', encoding="utf-8")
    assert main(["run", "--set", f"run.output_dir={tmp_path / 'run'}", "--set", f"data.source={bad}"]) == 2
    out, err = capsys.readouterr()
    assert f"task 'prepare-data' failed: {bad}: no usable question" in err
    assert "running in a fork" in out  # it did run in the worker's fork
