"""``lab spectrum``: the spectra of one adapter, without running any asset.

It is the quickest way to look at an adapter someone hands you. Its output is
part of the lab's interface: one parquet row per adapted module, whose first two
columns are ``module`` (the base model's module name) and ``singular_values``
(all of ΔW's singular values, descending), followed by the spectral features.
Plain argparse, no Dagster; numpy, torch and pandas are imported only when the
command runs, so ``lab --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab_assets.cli.common import add_command

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


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "spectrum",
        purpose="Write the singular values and spectral features of a PEFT LoRA adapter.",
        help="spectral features of a PEFT LoRA adapter",
        examples=[
            "lab spectrum path/to/adapter --base path/to/base_model --out spectrum.parquet",
        ],
        fn=_cmd_spectrum,
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


def _cmd_spectrum(args: argparse.Namespace) -> int:
    """Run ``lab spectrum``; returns the exit code (2 for bad input or an unsupported adapter)."""
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
