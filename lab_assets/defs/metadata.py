"""Turning results into Dagster UI metadata: plots as inline images, tables as markdown."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

from dagster import MetadataValue


def png_markdown(png: bytes | Path, alt: str) -> MetadataValue:
    data = png.read_bytes() if isinstance(png, Path) else png
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})")


def line_plot_png(values: Sequence[float], title: str, ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot(range(1, len(values) + 1), values, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> MetadataValue:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return MetadataValue.md("\n".join(lines))


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
