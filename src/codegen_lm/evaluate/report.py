"""What a run shows: progress bars with rate and ETA, the final table, and the pass@k plot."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .passk import pass_at_k


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.2f}/s" if task.speed else "-/s", style="progress.data.speed")


def progress(console: Console | None = None) -> Progress:
    """A bar per stage: done/total, rate, elapsed and ETA."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )


def table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    for name, value in rows:
        t.add_row(name, value)
    return t


def status_rows(statuses: Counter) -> list[tuple[str, str]]:
    total = sum(statuses.values())
    return [(f"  {status}", f"{count} ({100 * count / total:.1f}%)") for status, count in statuses.most_common()]


def plot_pass_at_k(counts: Sequence[tuple[int, int]], ks: Mapping[int, float], path: Path, title: str) -> None:
    """pass@k for every k from 1 to the smallest n, with the reported k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..hub import atomic_write_bytes

    fewest = min(n for n, _ in counts)
    xs = list(range(1, fewest + 1))
    ys = [100 * sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in xs]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, color="tab:blue")
    ax.scatter(list(ks), [100 * v for v in ks.values()], color="tab:red", zorder=3)
    for k, v in ks.items():
        ax.annotate(f"pass@{k} {100 * v:.2f}", (k, 100 * v), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if fewest > 1:
        ax.set_xscale("log")
    ax.set_xlabel("k (samples drawn per problem)")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
