"""The agent's preemption watch sees a flip between two long polls at once (`last_etag`).

The fake metadata server answers as GCE does: a long poll waits for a change from the
value it saw when it started unless `last_etag` names an older one. A watch without
`last_etag` would see a flip that lands between its polls only when the next poll times
out — 30 s, the whole of a spot VM's notice.
"""

from __future__ import annotations

import threading
import time

from lab_assets_tests.fakes.fake_metadata import FakeInstance, MetadataServer
from resources.remote.agent_metadata import Metadata


def _flip(inst: FakeInstance) -> None:
    with inst.changed:
        inst.preempted = True
        inst.changed.notify_all()


def test_a_flip_between_polls_is_seen_at_once():
    inst = FakeInstance("p", "us-central1-a", {"name": "vm"})
    server = MetadataServer(None, inst)
    try:
        md = Metadata(server.host)
        assert md.wait_preempted(timeout_s=1) is False  # nothing happened: the poll times out
        _flip(inst)  # between two polls
        t0 = time.monotonic()
        assert md.wait_preempted(timeout_s=20) is True
        assert time.monotonic() - t0 < 3
    finally:
        server.close()


def test_a_flip_during_a_poll_ends_it_and_one_before_the_first_is_seen():
    inst = FakeInstance("p", "us-central1-a", {"name": "vm"})
    server = MetadataServer(None, inst)
    try:
        md = Metadata(server.host)
        threading.Timer(0.5, _flip, args=(inst,)).start()
        t0 = time.monotonic()
        assert md.wait_preempted(timeout_s=20) is True
        assert time.monotonic() - t0 < 3
        late = Metadata(server.host)  # an agent that starts watching after the flip
        t0 = time.monotonic()
        assert late.wait_preempted(timeout_s=20) is True
        assert time.monotonic() - t0 < 3
    finally:
        server.close()


def test_agent_log_lines_survive_a_closed_stdout():
    """The agent echoes its lines to the stdout it inherited; once that pipe is closed (the
    startup-script runner stopped), lines still reach their stream and nothing raises."""
    import os

    from resources.remote.agent_sync import LineBuffer

    class Stream:
        def __init__(self):
            self.chunks: list[bytes] = []

        def append(self, data: bytes, content_type: str = "text/plain") -> None:
            self.chunks.append(data)

    r, w = os.pipe()
    os.close(r)  # the reader is gone: writing raises BrokenPipeError
    echo = os.fdopen(w, "w")
    stream = Stream()
    buf = LineBuffer(stream, echo=echo)
    buf.write_line("before")
    buf.write_line("after")
    buf.flush()
    assert stream.chunks == [b"before\nafter\n"]
    assert buf.echo is None
