"""How much does restoring a model-sized partition from GCS gain from sliced transfers?

Starts the GCS emulator (fake-gcs-server) itself, commits one partition shaped like a
base model, a safetensors file of ``--size-mb`` MB (a valid header plus random
bytes) and a few small JSON files, through ``GCSArtifactStore.commit``, then restores
it into an empty directory twice through the store's own download path (crc32c per
request or combined over slices, then sha256 against the manifest):

(a) sliced-parallel: files above ``--chunk-mb`` are fetched with
    ``transfer_manager.download_chunks_concurrently`` in ``--workers`` threads, the
    small files with ``download_many``;
(b) one stream: every file is one plain GET, one at a time.

It prints both throughputs (MB/s, MB = 10^6 bytes) and their ratio, from one run.
The emulator serves from local disk (or memory) with no per-stream bandwidth cap, and real GCS
caps each stream, so slicing pays on GCS and may not pay here.

Run: ``python benchmarks/gcs_restore_bench.py [--size-mb 256] [--workers 8] [--chunk-mb 32]
[--backend filesystem|memory]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab_assets_tests.fakes.gcs_emulator import Emulator  # noqa: E402
from resources.storage.base import verify_dir  # noqa: E402
from resources.storage.gcs.client import make_client  # noqa: E402
from resources.storage.gcs.session import GCSSession, TransferConfig  # noqa: E402
from resources.storage.gcs.store import GCSArtifactStore  # noqa: E402

BUCKET = "bench"


def write_model(d: Path, size_mb: int) -> int:
    """A safetensors-like model directory; returns its total size in bytes."""
    d.mkdir(parents=True)
    n = size_mb * 10**6
    header = json.dumps({"weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
    header += " " * (-len(header) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header.encode())
        block = os.urandom(8 << 20)
        left = n
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (d / name).write_text(json.dumps({"name": name, "pad": "x" * 2000}))
    return sum(p.stat().st_size for p in d.iterdir())


def restore(store: GCSArtifactStore, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = store.download("base_model", "bench", dest)
    seconds = time.perf_counter() - t0
    assert verify_dir(dest, manifest, str(dest)) == []
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="weights file size (MB)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--chunk-mb", type=int, default=32, help="slice size (MiB)")
    ap.add_argument(
        "--backend",
        choices=["filesystem", "memory"],
        default="filesystem",
        help="the emulator's storage backend (filesystem: the wrapper's default)",
    )
    args = ap.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="gcs-bench-") as tmp,
        Emulator(backend=args.backend) as emu,
    ):
        tmp = Path(tmp)
        emu.create_bucket(BUCKET)
        total = write_model(tmp / "model", args.size_mb)
        chunk = args.chunk_mb << 20

        def store_with(cfg: TransferConfig) -> GCSArtifactStore:
            session = GCSSession(make_client(endpoint=emu.url), transfer=cfg)
            return GCSArtifactStore(f"gs://{BUCKET}/lab", "bench", session=session)

        sliced = store_with(
            TransferConfig(sliced_threshold=chunk, chunk_size=chunk, max_workers=args.workers)
        )
        one = store_with(TransferConfig(sliced_threshold=1 << 62, max_workers=1))

        t0 = time.perf_counter()
        sliced.commit("base_model", "bench", tmp / "model")
        upload_s = time.perf_counter() - t0

        restore(one, tmp / "warmup")  # warms the emulator's and the OS's caches alike
        t_sliced = restore(sliced, tmp / "sliced")
        t_one = restore(one, tmp / "one")

    mb = total / 1e6
    print(f"partition: {mb:.1f} MB (1 safetensors file of {args.size_mb} MB + 3 JSON files)")
    print(
        f"upload (commit, single-stream on an emulator): {upload_s:.2f} s, {mb / upload_s:.0f} MB/s"
    )
    print(
        f"restore sliced-parallel ({args.workers} threads, {args.chunk_mb} MiB slices): "
        f"{t_sliced:.2f} s, {mb / t_sliced:.0f} MB/s"
    )
    print(f"restore one stream:                             {t_one:.2f} s, {mb / t_one:.0f} MB/s")
    print(f"sliced / one-stream throughput: {t_one / t_sliced:.2f}x")
    print(
        "note: the emulator serves from this machine with no per-stream bandwidth cap; real "
        "GCS caps each stream, so slicing pays on GCS and may not here. Both timings include "
        "crc32c and the sha256 check against the manifest."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
