"""Figures a person would rather look at than read, drawn with matplotlib, saved as PNG.

Shared by the per-run evaluation (a class histogram after each experience) and the report
over runs (gdjax/report.py). Figures are `matplotlib.figure.Figure` objects, rendered
without pyplot or a display (Agg), and written atomically.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from gdjax import files


def draw_class_histogram(ax, true, generated, *, error=None, title: str = "",
                         generated_label: str = "generated") -> None:
    """Per class, the true frequency (grey) beside the generated one (orange, with `error`
    bars when given), on the matplotlib axes `ax`."""
    true, generated = np.asarray(true, np.float64), np.asarray(generated, np.float64)
    x = np.arange(len(true))
    ax.bar(x - 0.2, true, 0.4, color="0.6", label="true (test images of the classes seen)")
    ax.bar(x + 0.2, generated, 0.4, yerr=error, color="tab:orange", capsize=2,
           label=generated_label)
    ax.set_xticks(x)
    ax.set_xlabel("class")
    ax.set_ylabel("fraction of images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def class_histogram(true, generated, *, title: str) -> Figure:
    """One run's class histogram: the true and the generated class frequencies."""
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    draw_class_histogram(fig.add_subplot(), true, generated, title=title,
                         generated_label="generated (labelled by the evaluation classifier)")
    return fig


def save_figure(fig: Figure, path, *, tight: bool = False) -> str:
    """Writes `fig` as a PNG (100 dpi) atomically; returns the path.

    `tight`: image axes keep their aspect, which the constrained layout does not leave room
    for multi-line titles around; the tight box grows the PNG to fit them."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None,
                pad_inches=0.1)
    return str(files.atomic_write(path, buffer.getvalue()))
