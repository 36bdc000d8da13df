"""The `lab` console script: one argparse tree (``main``), one module per command group."""
