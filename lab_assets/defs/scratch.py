"""Where an asset writes its output before the IO manager commits it to storage.

Under a step launcher the worker's own scratch directory (``$LAB_SCRATCH_DIR``,
deleted with the worker); in-process, a temporary directory that the IO manager
removes once the partition is committed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resources.remote.protocol import SCRATCH_ENV


@contextmanager
def output_dir(name: str) -> Iterator[Path]:
    """A fresh directory for one asset output; removed if the asset fails before returning."""
    base = os.environ.get(SCRATCH_ENV) or os.path.join(tempfile.gettempdir(), "lab-scratch")
    os.makedirs(base, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    try:
        yield d
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
