"""A wheel of the code that is running now, so a VM runs exactly that (uncommitted edits too).

The project's sources (``pyproject.toml``, ``README.md``, ``lab_assets/``,
``resources/``) are copied to a temporary directory, without caches, and built
there with ``pip wheel --no-deps --no-build-isolation`` (offline: it uses the
setuptools already installed, and never writes ``build/`` into the working tree).
Wheels are cached by a hash of those sources, so launching many partitions of
one run builds once.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = ("pyproject.toml", "README.md", "lab_assets", "resources")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")


class BundleError(RuntimeError):
    pass


def project_root() -> Path:
    """The source tree this process runs from (the directory holding pyproject.toml)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(
            f"{root}: no pyproject.toml; the GCE launcher packages the working tree, so run "
            "it from a source checkout (pip install -e .)"
        )
    return root


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        p = root / name
        files = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                h.update(f.relative_to(root).as_posix().encode() + b"\0")
                h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(root: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Build (or reuse) the wheel of the working tree; returns its path."""
    root = root or project_root()
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "lab-wheels") / source_hash(root)
    found = sorted(cache.glob("*.whl")) if cache.is_dir() else []
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="lab-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            p = root / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=_IGNORE)
            elif p.is_file():
                shutil.copy2(p, src / name)
        out = Path(tmp) / "out"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "-q",
                "-w",
                str(out),
                str(src),
            ],
            capture_output=True,
            text=True,
        )
        wheels = sorted(out.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise BundleError(f"pip wheel failed ({res.returncode}):\n{res.stderr[-3000:]}")
        cache.mkdir(parents=True, exist_ok=True)
        dest = cache / wheels[0].name
        shutil.copy2(wheels[0], dest)
        return dest
