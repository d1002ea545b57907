"""pyproject.toml lists packages by hand (two source roots); every package folder must be in it."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_folders() -> set[str]:
    found = set()
    roots = {
        "src/medcritical": "medcritical",
        "components": "medcritical.components",
        "pipelines": "medcritical.pipelines",
    }
    for root, name in roots.items():
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root)
            found.add(".".join([name, *relative.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert package_folders() == listed


def test_readme_test_command_is_what_ci_runs():
    ci_command = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command in (REPO / "README.md").read_text()
