"""A worker module for the warm server's detached mode (test only): report, wait, exit 7."""

import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    pid_file, release = Path(argv[0]), Path(argv[1])
    pid_file.write_text(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"probe done in {os.getcwd()} with LAB_PROBE={os.environ.get('LAB_PROBE')}")
    sys.stdout.flush()
    return 7
