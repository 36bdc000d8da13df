"""The storage preflight: an unwritable storage root stops `lab` before any compute starts.

Local roots: the directory is created if missing, a probe file written and deleted. The
unwritable case is a root whose parent is a regular file, which fails for root too (tests
may run as root, where a read-only mode does not stop writes). GCS roots: a probe object
is created and deleted on the emulator; a missing bucket fails, naming it.
"""

from __future__ import annotations

import os

import pytest

from lab_assets.cli.main import main
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR
from lab_assets_tests.fakes.gcs_emulator import Emulator
from resources.storage.base import StorageError
from resources.storage.preflight import PROBE_PREFIX, check_writable

GCE_EXPERIMENT = TESTS_DIR / "experiments" / "gce.yaml"
BUCKET = "lab-preflight-bucket"


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


@pytest.fixture
def unwritable(tmp_path):
    """A storage root no one can create: its parent is a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return blocker / "storage"


def test_a_missing_local_root_is_created_and_left_clean(tmp_path):
    root = tmp_path / "new" / "storage"
    probe = check_writable(str(root), "exp")
    assert os.path.basename(probe).startswith(PROBE_PREFIX)
    assert (root / "exp").is_dir() and list((root / "exp").iterdir()) == []


def test_an_unwritable_local_root_names_the_root_and_the_os_error(unwritable):
    with pytest.raises(StorageError) as err:
        check_writable(str(unwritable), "exp")
    msg = str(err.value)
    assert f"storage root {unwritable} is not writable" in msg
    assert "Not a directory" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_a_read_only_local_root(tmp_path):
    root = tmp_path / "ro"
    (root / "exp").mkdir(parents=True)
    (root / "exp").chmod(0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            check_writable(str(root), "exp")
    finally:
        (root / "exp").chmod(0o700)


@pytest.mark.parametrize(
    "argv",
    [
        ["validate"],
        ["materialize"],
        ["sweep"],
    ],
    ids=lambda a: a[0],
)
def test_commands_stop_before_any_compute_on_an_unwritable_root(
    argv, unwritable, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(unwritable))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main([*argv, "--experiment", str(SMALL_EXPERIMENT)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lab: storage root {unwritable} is not writable: ")
    assert "Not a directory" in err and "Traceback" not in err
    assert not home.exists()  # not even a Dagster instance was made


def test_validate_checks_a_writable_root(tmp_path, monkeypatch, capsys):
    root = tmp_path / "storage"
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["validate", "--experiment", str(SMALL_EXPERIMENT)]) == 0
    assert f"storage      {root} (writable" in capsys.readouterr().out
    assert list((root / "small").iterdir()) == []


def test_sweep_dry_run_only_reads_so_it_skips_the_preflight(tmp_path, monkeypatch):
    import resources.storage.preflight as preflight

    def unwritable(root, experiment, **kw):
        raise StorageError(f"storage root {root} is not writable: (test)")

    monkeypatch.setattr(preflight, "check_writable", unwritable)
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(tmp_path / "storage"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LAB_SCRATCH_ROOT", str(tmp_path))
    assert main(["sweep", "--dry-run", "--experiment", str(SMALL_EXPERIMENT)]) == 0
    assert main(["sweep", "--experiment", str(SMALL_EXPERIMENT)]) == 2


# -- GCS (the emulator) ---------------------------------------------------------------


def test_a_writable_bucket_passes_and_keeps_no_probe(emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    from resources.storage.gcs.session import GCSSession

    probe = check_writable(f"gs://{BUCKET}/some/prefix", "exp")
    assert probe.startswith(f"gs://{BUCKET}/some/prefix/exp/{PROBE_PREFIX}")
    assert GCSSession().list(BUCKET, "some/prefix/", "name") == []


def test_a_missing_bucket_fails_naming_it(emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    with pytest.raises(StorageError) as err:
        check_writable("gs://no-such-bucket/x", "exp", timeout_s=10)
    msg = str(err.value)
    assert "storage root gs://no-such-bucket/x is not writable" in msg
    assert "bucket 'no-such-bucket' does not exist" in msg


def test_lab_launch_stops_before_any_vm_on_a_missing_bucket(emulator, tmp_path, monkeypatch):
    # Compute Engine refuses connections: a VM insert would fail the command differently.
    monkeypatch.setenv("LAB_GCE_API_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_STORAGE_ROOT", "gs://no-such-bucket/x")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    from lab_assets.cli.gce import gce_main

    argv = ["launch", "--asset", "adapter", "--partition", "tiny-test|sft-arith-r4-s0"]
    assert gce_main([*argv, "--experiment", str(GCE_EXPERIMENT)]) == 2
    assert not (tmp_path / "home").exists()


def test_lab_validate_on_a_gcs_root(emulator, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LAB_STORAGE_ROOT", f"gs://{BUCKET}/v")
    assert main(["validate", "--experiment", str(GCE_EXPERIMENT)]) == 0
    monkeypatch.setenv("LAB_STORAGE_ROOT", "gs://no-such-bucket/v")
    assert main(["validate", "--experiment", str(GCE_EXPERIMENT)]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
