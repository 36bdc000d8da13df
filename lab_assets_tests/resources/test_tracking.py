"""Where runs go, what a link looks like, and that credentials never show (no MLflow calls)."""

import socket
import time
from pathlib import Path

from resources.tracking import (
    TRACKING_URI_ENV,
    RunRecord,
    local_db,
    log_run,
    public_uri,
    run_link,
    tracking_uri,
)


def test_tracking_uri_env_else_local_sqlite_else_none(monkeypatch, tmp_path):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    db = tmp_path.resolve() / "exp" / "mlflow" / "mlflow.db"
    assert local_db(str(tmp_path), "exp") == db
    assert tracking_uri(str(tmp_path), "exp") == f"sqlite:///{db}"
    assert tracking_uri("gs://bucket/prefix", "exp") is None
    monkeypatch.setenv(TRACKING_URI_ENV, "http://mlflow.example:5000")
    assert tracking_uri("gs://bucket/prefix", "exp") == "http://mlflow.example:5000"


def test_links_and_uris_carry_no_credentials():
    assert public_uri("https://u:secret@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert public_uri("sqlite:////tmp/a/mlflow.db") == "sqlite:////tmp/a/mlflow.db"
    assert (
        run_link("https://u:secret@mlflow.example/", "3", "abc")
        == "https://mlflow.example/#/experiments/3/runs/abc"
    )
    assert run_link("sqlite:////tmp/a/mlflow.db", "3", "abc") is None


def test_a_gs_root_without_tracking_uri_is_skipped_with_one_info_line(monkeypatch):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    infos: list[str] = []
    warns: list[str] = []
    record = RunRecord("exp", "model|run")
    assert log_run(record, "gs://bucket/prefix", info=infos.append, warn=warns.append) is None
    assert len(infos) == 1 and "MLflow" in infos[0] and TRACKING_URI_ENV in infos[0]
    assert warns == []


def test_an_error_is_one_warning_without_the_password(monkeypatch, tmp_path):
    monkeypatch.setenv(TRACKING_URI_ENV, "no-such-scheme://somewhere")
    warns: list[str] = []
    assert log_run(RunRecord("exp", "r"), str(tmp_path), info=print, warn=warns.append) is None
    assert len(warns) == 1 and warns[0].startswith("MLflow: run r not logged")
    monkeypatch.setenv(TRACKING_URI_ENV, "http://user:hunter2@127.0.0.1:1")
    warns.clear()
    assert log_run(RunRecord("exp", "r"), str(tmp_path), info=print, warn=warns.append) is None
    assert len(warns) == 1 and "hunter2" not in warns[0] and "127.0.0.1:1" in warns[0]
    assert not any(Path(tmp_path).iterdir())  # nothing written under the root


def test_a_server_that_never_answers_costs_at_most_the_deadline(monkeypatch, tmp_path):
    with socket.socket() as server:  # accepts connections (the kernel does), never replies
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv(TRACKING_URI_ENV, f"http://127.0.0.1:{server.getsockname()[1]}")
        warns: list[str] = []
        t0 = time.monotonic()
        record = RunRecord("exp", "r")
        tracked = log_run(record, str(tmp_path), info=print, warn=warns.append, deadline_s=1.0)
        assert tracked is None and time.monotonic() - t0 < 5
        assert len(warns) == 1 and "no answer in 1 s" in warns[0]
