"""PNG charts of the tables (``--plot``), when matplotlib is importable."""

from __future__ import annotations

import re
from pathlib import Path

from ._common import Table, optional

__all__ = ["plot"]


def plot(tables: list[Table], stem: Path) -> str:
    """One horizontal bar chart per table (median with min-max error bars).

    Returns a line saying what was written, or why nothing was.
    """
    matplotlib = optional("matplotlib")
    if matplotlib is None:
        return "--plot: matplotlib is not installed (pip install 'fineflow[plot]'); no charts"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    for index, table in enumerate(tables):
        rows = [r for r in table.rows if r.value is not None]
        if not rows:
            continue
        names = [r.name for r in rows]
        medians = [r.value.median for r in rows if r.value is not None]
        low = [r.value.median - r.value.low for r in rows if r.value is not None]
        high = [r.value.high - r.value.median for r in rows if r.value is not None]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
        colors = ["tab:green" if "fineflow" in n else "tab:gray" for n in names]
        ax.barh(names, medians, xerr=[low, high], color=colors)
        ax.invert_yaxis()
        positive = [m for m in medians if m > 0]
        if positive and len(positive) == len(medians) and max(positive) > 50 * min(positive):
            ax.set_xscale("log")  # e.g. microseconds next to milliseconds: keep both readable
        ax.set_xlabel(
            (rows[0].unit or "ratio") + (", log scale" if ax.get_xscale() == "log" else "")
        )
        ax.set_title(table.title, fontsize=10)
        fig.tight_layout()
        slug = re.sub(r"[^a-z0-9]+", "-", table.title.lower()).strip("-")[:60]
        path = stem.parent / f"{stem.name}-{index:02d}-{slug}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return f"wrote {len(written)} charts next to {stem}"
