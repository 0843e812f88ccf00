"""``fineflow stats --plot``: allowed and denied requests per minute as a PNG (matplotlib)."""

from __future__ import annotations

import importlib
from datetime import datetime, timedelta
from pathlib import Path

from ._errors import FineflowError
from ._storage.base import StatsPoint

__all__ = ["plot_series"]


def plot_series(points: list[StatsPoint], path: str | Path, *, by: tuple[str, ...]) -> None:
    """Draw ``points`` to the PNG ``path``: allowed requests per minute above, denied below,
    one line per group (minutes without requests drawn as 0).

    Raises:
        FineflowError: matplotlib is not installed, or the file cannot be written.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise FineflowError("--plot needs matplotlib: pip install 'fineflow[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    groups = sorted({(p.endpoint, p.tier) for p in points})
    minutes = _minutes(points)
    counts = {(p.minute, p.endpoint, p.tier): (p.allowed, p.denied) for p in points}
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for endpoint, tier in groups:
        label = " / ".join(part for part in (endpoint, tier) if part) or "all requests"
        series = [counts.get((m, endpoint, tier), (0, 0)) for m in minutes]
        top.plot(minutes, [a for a, _ in series], marker=".", label=label)
        bottom.plot(minutes, [d for _, d in series], marker=".", label=label)
    grouped = f"by {', '.join(by)}" if by else "in total"
    top.set_title(f"fineflow: requests per minute, {grouped}")
    top.set_ylabel("allowed / minute")
    bottom.set_ylabel("denied / minute")
    bottom.set_xlabel("minute (UTC)")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if groups:
        top.legend(fontsize="small", loc="upper left")
    else:
        top.text(0.5, 0.5, "no requests counted", ha="center", transform=top.transAxes)
    within_a_day = bool(minutes) and minutes[-1] - minutes[0] < timedelta(days=1)
    # (matplotlib's DateFormatter is not annotated)
    formatter = DateFormatter("%H:%M" if within_a_day else "%Y-%m-%d %H:%M")  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_formatter(formatter)
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise FineflowError(f"cannot write the plot to {str(path)!r}: {exc}") from exc
    finally:
        plt.close(fig)


# Beyond this many minutes (two weeks), only the minutes with requests are drawn.
_FILL_MAX = 20_160


def _minutes(points: list[StatsPoint]) -> list[datetime]:
    """Every minute from the first point's to the last one's (the points' own minutes if
    that is too many)."""
    if not points:
        return []
    first, last = points[0].minute, points[-1].minute
    count = int((last - first) / timedelta(minutes=1)) + 1
    if count > _FILL_MAX:
        return sorted({p.minute for p in points})
    return [first + timedelta(minutes=i) for i in range(count)]
