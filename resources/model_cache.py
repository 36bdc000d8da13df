"""The model cache: base model snapshots at a pinned revision, nearest tier first.

Tiers, nearest first: a local directory (e.g. baked into a VM image), then the
Hugging Face Hub at the pinned revision (``huggingface_hub.snapshot_download``).
A snapshot fetched from a farther tier is stored in the nearer ones for next
time. A local entry counts only when its completion marker, listing every file
with its size, matches what is on disk; otherwise it is refetched, never used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import ConfigurableResource

# What a causal LM needs; never pickles (*.bin) or other frameworks' weights.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
MARKER = ".lab-complete.json"


class ModelCacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class FetchResult:
    path: Path
    tier: str  # "local" | "hub"
    seconds: float


def _entry_dir(root: Path, repo_id: str, revision: str) -> Path:
    return root / repo_id.replace("/", "--") / revision


def _listing(d: Path) -> dict[str, int]:
    return {
        p.relative_to(d).as_posix(): p.stat().st_size
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MARKER and ".cache" not in p.relative_to(d).parts
    }


def local_entry_ok(d: Path) -> bool:
    """The entry is complete: marker present and every listed file has its listed size."""
    try:
        listed = json.loads((d / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(listed) and _listing(d) == listed


class ModelCache(ConfigurableResource):
    """Fetches `repo_id@revision` snapshots: local disk, then the Hub."""

    local_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "task-geometry-lab", "models")
    hub_endpoint: str | None = None  # None: huggingface_hub's default (or $HF_ENDPOINT)
    # None: huggingface_hub reads $HF_TOKEN itself; otherwise pass EnvVar("HF_TOKEN").
    hub_token: str | None = None

    def fetch(self, repo_id: str, revision: str, log=None) -> FetchResult:
        log = log or (lambda msg: None)
        t0 = time.perf_counter()
        entry = _entry_dir(Path(self.local_dir), repo_id, revision)
        if local_entry_ok(entry):
            return FetchResult(entry, "local", time.perf_counter() - t0)
        if entry.exists():
            log(f"model cache: {entry} is incomplete or corrupt; refetching")
        self._from_hub(repo_id, revision, entry, log)
        return FetchResult(entry, "hub", time.perf_counter() - t0)

    def _from_hub(self, repo_id: str, revision: str, entry: Path, log) -> None:
        from huggingface_hub import snapshot_download

        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=entry.parent))
        try:
            log(f"model cache: downloading {repo_id}@{revision} from the Hub")
            snapshot_download(
                repo_id=repo_id,
                revision=revision,
                local_dir=staging,
                allow_patterns=SNAPSHOT_PATTERNS,
                endpoint=self.hub_endpoint,
                token=self.hub_token,
            )
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            files = _listing(staging)
            if not any(f.endswith(".safetensors") for f in files):
                raise ModelCacheError(f"{repo_id}@{revision}: the snapshot has no safetensors")
            (staging / MARKER).write_text(json.dumps({"files": files}))
            shutil.rmtree(entry, ignore_errors=True)
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
