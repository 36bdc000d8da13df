"""Warm worker server fixtures: each gives its tests their own socket directory (so
they start their own server, never a developer's) and stops every server started in
it afterwards, so no test leaves a server running."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from resources.compute.local.warm_server import stop_servers
from resources.procs import alive as proc_alive
from resources.remote.protocol import WARM_PRELOAD_ENV, WARM_SOCKET_DIR_ENV


def _own_socket_dir(extra_env: dict[str, str]):
    # short and under /tmp: a Unix socket path must fit in 108 bytes
    directory = Path(tempfile.mkdtemp(prefix="lw-", dir="/tmp"))
    env = {WARM_SOCKET_DIR_ENV: str(directory), **extra_env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield directory
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        pids = stop_servers(directory)
        shutil.rmtree(directory, ignore_errors=True)
        assert not [p for p in pids if proc_alive(p)]


@pytest.fixture(scope="module")
def warm_server_dir():
    """One socket dir (so one server, default preload: torch & co) per test module."""
    yield from _own_socket_dir({})


@pytest.fixture
def light_server_dir():
    """A socket dir for one test, its server preloading only dagster (starts fast)."""
    yield from _own_socket_dir({WARM_PRELOAD_ENV: "dagster"})
