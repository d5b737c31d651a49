"""The course's truth-vs-guess scatter: one point per item, coloured by its verdict, and the line y = x.

matplotlib is imported here only (the `demo` extra), with the Agg backend: no display needed.
"""
from __future__ import annotations

import os

from .metrics import PriceReport


def scatter_figure(report: PriceReport, name: str = ""):
    """A matplotlib Figure: x ground truth, y estimate, points green/orange/red, a dashed y = x."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    ax = fig.subplots()
    top = max(max(report.truths), max(report.guesses)) * 1.05
    ax.plot([0, top], [0, top], color="deepskyblue", linewidth=2, alpha=0.6, linestyle="--")
    ax.scatter(report.truths, report.guesses, s=6, c=report.colors)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("Ground Truth")
    ax.set_ylabel("Model Estimate")
    ax.set_title(report.title(name))
    return fig


def save_scatter(report: PriceReport, path: str, name: str = "") -> str:
    """Write the scatter as a PNG (through a temporary name, then renamed); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig = scatter_figure(report, name)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def log_to_tensorboard(report: PriceReport, run_dir: str, tag: str = "pricer", step: int = 0, name: str = "") -> None:
    """The chart, the hit rate, the mean error and the RMSLE, in the run's TensorBoard folder."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run_dir) as writer:
        writer.add_figure(f"{tag}/truth_vs_guess", scatter_figure(report, name), step)
        writer.add_scalar(f"{tag}/hit_rate", report.hit_rate, step)
        writer.add_scalar(f"{tag}/mean_error", report.mean_error, step)
        writer.add_scalar(f"{tag}/rmsle", report.rmsle, step)
