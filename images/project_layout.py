"""What of the checkout goes into an image, read from pyproject.toml (used by images/build.sh).

    python3 images/project_layout.py roots PYPROJECT   print the folders holding the packages
    python3 images/project_layout.py stub PYPROJECT    create empty packages next to PYPROJECT

`stub` lets the Dockerfiles install every dependency from pyproject.toml alone, in a layer that a
source change does not invalidate: pip installs the stub project (with torch pinned in the same
command), then the real project replaces it without touching the dependencies.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def _setuptools(pyproject: dict) -> dict:
    return pyproject.get("tool", {}).get("setuptools", {})


def package_dirs(pyproject: dict) -> dict[str, str]:
    """Each package -> its folder, relative to the project root."""
    tool = _setuptools(pyproject)
    mapping: dict[str, str] = tool.get("package-dir", {})
    packages = tool.get("packages")
    if isinstance(packages, list):
        names = packages
    else:  # packages.find: the project's own top-level package under each `where`
        where = (packages or {}).get("find", {}).get("where", ["."])
        name = pyproject["project"]["name"].replace("-", "_")
        return {name: str(Path(where[-1]) / name)}  # the last `where` holding it, as before
    result = {}
    for name in names:
        # The longest mapped prefix decides, as in setuptools; "" maps the top level.
        parts = name.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                result[name] = str(Path(mapping[prefix], *parts[cut:]))
                break
        else:
            result[name] = str(Path(*parts))
    return result


def roots(pyproject: dict) -> list[str]:
    """Top-level folders of the checkout that hold packages (e.g. src, components, pipelines)."""
    return sorted({Path(folder).parts[0] for folder in package_dirs(pyproject).values()})


def stub(path: Path) -> None:
    pyproject = tomllib.loads(path.read_text(encoding="utf-8"))
    for folder in package_dirs(pyproject).values():
        package = path.parent / folder
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").touch()
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        (path.parent / readme).touch()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("roots", "stub"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "stub":
        stub(path)
    else:
        print("\n".join(roots(tomllib.loads(path.read_text(encoding="utf-8")))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
