"""Reading an agent's chunk stream in GCS: numbered objects, each read once, in order.

The agent on the VM uploads its events and log lines as ``protocol.chunk_name``
objects (0, 1, 2, ...) and never rewrites one, so a reader only has to remember
the next index and ask for it until it is not there yet.
"""

from __future__ import annotations

from collections.abc import Iterator

from resources.compute.gce.gcs import Gcs
from resources.remote import protocol


class ChunkReader:
    """Reads an agent chunk stream: the next numbered object, while it exists."""

    def __init__(self, gcs: Gcs, prefix: str, suffix: str):
        self.gcs, self.prefix, self.suffix = gcs, prefix, suffix
        self.next_index = 0

    def poll(self) -> Iterator[bytes]:
        while True:
            data = self.gcs.read_bytes(
                protocol.chunk_name(self.prefix, self.next_index, self.suffix)
            )
            if data is None:
                return
            self.next_index += 1
            yield data
