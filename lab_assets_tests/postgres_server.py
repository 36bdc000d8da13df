"""A real PostgreSQL server for the tests, started with the README's own script.

`scripts/local_postgres.sh` creates a password-protected server on 127.0.0.1 (as the
`postgres` user when the tests run as root) in a fresh directory; the fixture yields
the `DAGSTER_PG_*` variables that `dagster.team.example.yaml` reads, and stops and
deletes the server at the end of the session. Never a mock: the run storage, event
log, pools and advisory locks are PostgreSQL's own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "local_postgres.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> dict[str, str]:
    # Under /tmp itself: the server's user must be able to reach its directory.
    directory = Path(tempfile.mkdtemp(prefix="lab-pg-"))
    shutil.rmtree(directory)
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(directory), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    # `export K=V ... DAGSTER_PG_PASSWORD=$(cat 'DIR/password')`, as a user would eval it
    env = {}
    for word in shlex.split(started.stdout.strip().removeprefix("export ")):
        key, _, value = word.partition("=")
        if key.startswith("DAGSTER_PG_") and key != "DAGSTER_PG_PASSWORD":
            env[key] = value
    env["DAGSTER_PG_PASSWORD"] = (directory / "password").read_text().strip()
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def psql(env: dict[str, str], sql: str) -> str:
    """Run one statement with psql against the test server; its unaligned output."""
    out = subprocess.run(
        [
            "psql",
            "-h",
            env["DAGSTER_PG_HOST"],
            "-p",
            env["DAGSTER_PG_PORT"],
            "-U",
            env["DAGSTER_PG_USER"],
            "-d",
            env["DAGSTER_PG_DB"],
            "-tAc",
            sql,
        ],
        env={**os.environ, "PGPASSWORD": env["DAGSTER_PG_PASSWORD"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
