"""Turning results into Dagster UI metadata a researcher reads at a glance.

Numbers are typed and rounded (``SIG_DIGITS`` significant digits), tables are
``MetadataValue.table`` with a ``TableSchema``, and plots are PNG files written into the
partition's output directory (so they are committed with it and listed in its manifest)
and linked from the metadata by their stored location, never inlined as base64.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from resources.io_manager import LabStorage, storage_link

SIG_DIGITS = 4


def sig(x: float, digits: int = SIG_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (non-finite values unchanged)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def typed(v: Any) -> MetadataValue:
    """A plain value as typed metadata: null, bool, int, rounded float, else text."""
    if v is None:
        return MetadataValue.null()
    if isinstance(v, bool):
        return MetadataValue.bool(v)
    if isinstance(v, int):
        return MetadataValue.int(v)
    if isinstance(v, float):
        return MetadataValue.float(sig(v))
    if isinstance(v, list | tuple):
        return MetadataValue.text(", ".join(map(str, v)))
    return MetadataValue.text(str(v))


def prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """``{f"{prefix}/{k}": typed(v)}``: e.g. every hyper-parameter as ``hp/<name>``."""
    return {f"{prefix}/{k}": typed(v) for k, v in values.items()}


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


def stored_file(storage: LabStorage, asset: str, partition: str | None, name: str) -> MetadataValue:
    """Where the partition's file ``name`` is once committed: a local path or console URL."""
    return storage_link(f"{storage.store.uri(asset, partition)}/{name}", is_file=True)


def save_plot(
    png: bytes, out: Path, name: str, storage: LabStorage, asset: str, partition: str | None
) -> MetadataValue:
    """Write ``png`` as ``out/name`` (committed with the partition) and link its stored copy."""
    (out / name).write_bytes(png)
    return stored_file(storage, asset, partition, name)


_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


def table(columns: Sequence[tuple[str, type]], rows: Sequence[Sequence[Any]]) -> MetadataValue:
    """A typed table: ``columns`` are (name, python type); floats rounded."""
    schema = TableSchema(columns=[TableColumn(n, _TYPES[t]) for n, t in columns])
    records = [
        TableRecord({n: _cell(v, t) for (n, t), v in zip(columns, row, strict=True)})
        for row in rows
    ]
    return MetadataValue.table(records=records, schema=schema)


def _cell(v: Any, t: type) -> Any:
    if v is None:
        return None
    if t is float:
        return sig(v)
    return t(v)


def frame_table(df: Any, max_rows: int = 20) -> MetadataValue:
    """The first ``max_rows`` rows of a pandas frame as a typed table."""
    head = df.head(max_rows)
    columns = [(c, _py_type(head[c].dtype)) for c in head.columns]
    return table(columns, list(head.itertuples(index=False, name=None)))


def _py_type(dtype: Any) -> type:
    kind = getattr(dtype, "kind", "O")
    return {"b": bool, "i": int, "u": int, "f": float}.get(kind, str)


def p_value_text(p: float | None, floor: float) -> str:
    """``p < 0.005`` at the permutation floor (the floor rounded up), else ``p = 0.224``."""
    if p is None:
        return "p n/a"
    if p <= floor * (1 + 1e-9):
        scale = 10 ** (1 - math.floor(math.log10(floor)))  # two significant digits
        return f"p < {math.ceil(floor * scale) / scale:g}"
    return f"p = {p:.3f}"


def headline(target: str, res: Mapping[str, Any], floor: float) -> str:
    """One line: ``task 0.967 [0.83, 0.99], p < 0.005 vs chance 0.333``."""
    p = res.get("p_value")
    return (
        f"{target} {_num(res.get('accuracy'), 3)} "
        f"[{_num(res.get('ci_low'), 2)}, {_num(res.get('ci_high'), 2)}], "
        f"{p_value_text(None if p is None else float(p), floor)} "
        f"vs chance {_num(res.get('chance'), 3)}"
    )


def _num(v: float | None, decimals: int) -> str:
    return "n/a" if v is None else f"{float(v):.{decimals}f}"
