"""``lab spectrum``: the spectra of one adapter, without running any asset.

It is the quickest way to look at an adapter someone hands you, and the
command-line face of the ``lab spectrum`` contract in DESIGN.md: one parquet
row per adapted module, ``module`` (the base model's module name) and
``singular_values`` (all of ΔW's, descending) first. Plain argparse, no Dagster,
so importing it is cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_SUMMARY_COLUMNS = [
    "module",
    "rank",
    "spectral_norm",
    "fro_norm",
    "stable_rank",
    "effective_rank",
    "subspace_overlap",
    "intruder_dims",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab spectrum",
        description="Singular values and spectral features of a PEFT LoRA adapter's updates.",
    )
    parser.add_argument("adapter_dir", type=Path, help="PEFT adapter directory")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="base model directory (safetensors) for base-relative features",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="singular triplets of the base used for base-relative features (default 16)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.parquet")
    return parser


def spectrum_main(argv: list[str]) -> int:
    """Run ``lab spectrum``; returns the exit code (2 for bad input or an unsupported adapter)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    # Imported here so `lab --help` does not pay for numpy/torch/pandas.
    import pandas as pd

    from lab_assets.ml.adapter_io import UnsupportedAdapterError
    from lab_assets.ml.spectral import adapter_spectrum, write_spectrum_parquet

    if args.top_k is not None and args.top_k < 1:
        print("lab spectrum: --top-k must be at least 1", file=sys.stderr)
        return 2
    try:
        df = adapter_spectrum(args.adapter_dir, base_dir=args.base, top_k=args.top_k)
    except FileNotFoundError as exc:
        print(f"lab spectrum: {exc}", file=sys.stderr)
        return 2
    except UnsupportedAdapterError as exc:
        print(f"lab spectrum: unsupported adapter: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as exc:
        print(f"lab spectrum: {exc}", file=sys.stderr)
        return 2
    write_spectrum_parquet(df, args.out)

    columns = [c for c in _SUMMARY_COLUMNS if c in df.columns and not df[c].isna().all()]
    with pd.option_context("display.width", 160, "display.max_rows", 40, "display.precision", 4):
        print(df[columns].to_string(index=False, max_rows=40))
    print(f"{len(df)} modules -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(spectrum_main(sys.argv[1:]))
