"""The `lab` console script: one argparse tree, one module per command group.

- `lab materialize | sweep | reconcile | validate`: an experiment's partitions
  through Dagster (lab_assets/cli/runs.py).
- `lab fetch`: sync an experiment's results to a local directory (cli/fetch.py).
- `lab spectrum`: spectral features of any PEFT LoRA adapter (cli/spectrum.py).
- `lab launch | vms | image`: one partition on a GCE VM, the experiment's VMs, the VM
  image (cli/gce.py).
- `lab compare`: several experiments' results side by side, from storage (cli/compare.py).
- `lab doctor`: is the GCP project ready for the experiment (cli/doctor.py).

Each module's `register(subparsers)` adds its commands (nested groups as
sub-subparsers); `main` parses once and runs the chosen command.
"""

from __future__ import annotations

import argparse
import sys

from lab_assets.cli import compare, doctor, fetch, gce, runs, spectrum
from lab_assets.cli.common import build_tree, run

DESCRIPTION = "Task-geometry lab: experiments as partitioned Dagster assets."


def build_parser() -> argparse.ArgumentParser:
    return build_tree(
        DESCRIPTION,
        [
            runs.register,
            fetch.register,
            spectrum.register,
            gce.register,
            doctor.register,
            compare.register,
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
