"""What the VM agent mirrors to GCS: append-only streams and complete checkpoints.

Split out of ``agent`` (it ships to the VM beside it; stdlib and google-cloud-storage
only, through the bucket object it is handed). GCS objects are immutable, so a
stream is a sequence of numbered chunk objects, each written only after the one
before it exists: a reader that lists the prefix never sees a gap. Checkpoints go
up with their completion marker last, so a reader never takes a half-uploaded one
for complete.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from resources.remote.protocol import SYNC_DONE, SYNC_REQUEST, chunk_name


class ChunkStream:
    """An append-only stream stored as numbered objects ``prefix/00000000.suffix``, ..."""

    def __init__(self, bucket, prefix: str, suffix: str):
        self.bucket, self.prefix, self.suffix = bucket, prefix, suffix
        self.next_index = 0
        self._lock = threading.Lock()

    def append(self, data: bytes, content_type: str = "text/plain") -> None:
        if not data:
            return
        with self._lock:
            name = chunk_name(self.prefix, self.next_index, self.suffix)
            retry(lambda: self.bucket.blob(name).upload_from_string(data, content_type))
            self.next_index += 1


class LineBuffer:
    """Lines written by several threads, shipped as one chunk per flush."""

    def __init__(self, stream: ChunkStream, echo=None):
        self.stream = stream
        self.echo = echo
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        if self.echo is not None:
            try:
                self.echo.write(line + "\n")
                self.echo.flush()
            except (OSError, ValueError):
                # The inherited stdout is gone (the startup-script runner that started the
                # agent was stopped, closing its pipe): the lines still go to GCS.
                self.echo = None
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            self.stream.append(("\n".join(lines) + "\n").encode())


class FileTail:
    """Ships the complete lines appended to a local file since the last flush."""

    def __init__(self, path: Path, stream: ChunkStream):
        self.path, self.stream = path, stream
        self._offset = 0
        self._lock = threading.Lock()

    def flush(self) -> None:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1  # only whole lines: an event is one line
            if end:
                self.stream.append(data[:end], "application/x-ndjson")
                self._offset += end


def _file_key(p: Path) -> tuple[float, int]:
    st = p.stat()
    return (st.st_mtime, st.st_size)


def retry(fn, tries: int = 5):
    for i in range(tries):
        try:
            return fn()
        except Exception:
            if i == tries - 1:
                raise
            time.sleep(0.5 * 2**i)


# -- checkpoints --------------------------------------------------------------------------


class CheckpointSync:
    """Mirrors complete checkpoints between a local directory and a GCS prefix.

    A top-level sub-directory is a checkpoint; it is complete once it holds
    ``marker`` (the HF Trainer writes ``trainer_state.json`` last). Complete ones
    are uploaded with the marker last, so a reader of GCS also never sees a
    half-uploaded checkpoint as complete; ones deleted locally (the Trainer's
    ``save_total_limit``) are deleted from GCS after newer ones are up. Top-level
    files (e.g. a note of which run owns the directory) are uploaded when changed.
    """

    def __init__(self, bucket, prefix: str, local: Path, marker: str = "trainer_state.json"):
        self.bucket, self.prefix, self.local, self.marker = (
            bucket,
            prefix.rstrip("/"),
            local,
            marker,
        )
        self._synced: dict[str, Any] = {}  # dir -> marker mtime; "/file" -> (mtime, size)
        self._lock = threading.Lock()

    def download(self) -> list[str]:
        """Fetch the complete checkpoints in GCS; returns their names."""
        self.local.mkdir(parents=True, exist_ok=True)
        by_dir: dict[str, list] = {}
        for blob in self.bucket.list_blobs(prefix=self.prefix + "/"):
            rel = blob.name[len(self.prefix) + 1 :]
            top, sep, _ = rel.partition("/")
            if sep:
                by_dir.setdefault(top, []).append((rel, blob))
            else:
                dest = self.local / rel
                blob.download_to_filename(str(dest))
                self._synced[f"/{rel}"] = _file_key(dest)
        got = []
        for top, blobs in sorted(by_dir.items()):
            if not any(rel == f"{top}/{self.marker}" for rel, _ in blobs):
                continue  # incomplete upload: never resume from it
            for rel, blob in sorted(blobs, key=lambda rb: rb[0].endswith(self.marker)):
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(dest))
            marker = self.local / top / self.marker
            self._synced[top] = marker.stat().st_mtime
            got.append(top)
        return got

    def serve_request(self) -> str | None:
        """If the step asked for a checkpoint to be made durable (`SYNC_REQUEST`), upload
        what is complete and answer (`SYNC_DONE`); returns the checkpoint's name, if any."""
        request = self.local / SYNC_REQUEST
        try:
            name = request.read_text().strip()
        except FileNotFoundError:
            return None
        done = self.local / SYNC_DONE
        if not name or (done.is_file() and done.read_text().strip() == name):
            return None
        self.upload()
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(name)
        tmp.replace(done)
        return name

    def upload(self) -> list[str]:
        """Upload checkpoints completed since the last call; returns their names."""
        with self._lock:
            if not self.local.is_dir():
                return []
            done = []
            present = set()
            top = (p for p in self.local.iterdir() if p.is_file() and not p.name.startswith("."))
            for f in sorted(top):
                key = _file_key(f)
                if self._synced.get(f"/{f.name}") != key:
                    name = f"{self.prefix}/{f.name}"
                    retry(lambda f=f, name=name: self.bucket.blob(name).upload_from_filename(f))
                    self._synced[f"/{f.name}"] = key
            for d in sorted(p for p in self.local.iterdir() if p.is_dir()):
                marker = d / self.marker
                if not marker.is_file():
                    continue
                present.add(d.name)
                mtime = marker.stat().st_mtime
                if self._synced.get(d.name) == mtime:
                    continue
                files = sorted(p for p in d.rglob("*") if p.is_file() and p != marker)
                for p in [*files, marker]:
                    name = f"{self.prefix}/{p.relative_to(self.local).as_posix()}"
                    retry(lambda p=p, name=name: self.bucket.blob(name).upload_from_filename(p))
                self._synced[d.name] = mtime
                done.append(d.name)
            for gone in {k for k in self._synced if not k.startswith("/")} - present:
                for blob in self.bucket.list_blobs(prefix=f"{self.prefix}/{gone}/"):
                    blob.delete()
                del self._synced[gone]
            return done
