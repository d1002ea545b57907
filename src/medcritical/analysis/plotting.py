"""One set-up for every figure the project writes (loss curves, accuracies, self-play rounds).

Headless (the Agg backend: no display in pods or CI), one style, saved at one resolution and closed,
so a long run never accumulates open figures:

    with figure(path, ncols=2, size=(11, 4)) as (fig, (left, right)):
        left.plot(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

DPI = 100
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}


@contextlib.contextmanager
def figure(path: str | Path, *, nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7, 4)) -> Iterator:
    """(figure, axes) to draw on; written to `path` when the block ends without an error."""
    # Imported here: a pipeline task that draws nothing should not pay for matplotlib (a third of a second).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=size)
        try:
            yield fig, axes
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)
