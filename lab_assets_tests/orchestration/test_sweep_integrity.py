"""The sweep sees corrupt partitions; a run refuses a corrupt input.

Works on a private copy of the session's materialised small experiment (`lab_copy`
of test_sweep.py), corrupting stored files in place as a bad copy or a careless edit
would: a byte flipped with the mtime restored, a truncated file, a stray file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab_assets.experiment.load import load_experiment
from lab_assets.orchestration.runner import PlannedRun, RunFailed, run_planned
from lab_assets.orchestration.sweep import CORRUPT, assess, plan_sweep
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR
from lab_assets_tests.orchestration.test_sweep import (  # noqa: F401 (fixture)
    EDITED,
    lab_copy,
    not_fresh,
    store_for,
)
from resources.storage.base import CHEAP, FULL

WEIGHTS = "adapter_model.safetensors"
OTHER = "tiny-test|sft-arith-r4-s0"


def flip_byte(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cheap_check_sees_truncation_and_strays_full_check_sees_flips(lab_copy):  # noqa: F811
    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    store = store_for(exp, lab_copy)
    assert store.is_complete("spectral_features", OTHER)
    flip_byte(store.local_path("adapter", EDITED) / WEIGHTS)
    features = store.local_path("spectral_features", OTHER)
    (features / "notes.txt").write_text("left here by hand")
    with open(
        store.local_path("base_spectrum", "tiny-test") / "base_spectrum.safetensors", "r+b"
    ) as f:
        f.truncate(100)

    cheap = not_fresh(assess(exp, instance, store))  # the default: what automation runs
    assert set(cheap) == {("spectral_features", OTHER), ("base_spectrum", "tiny-test")}
    assert cheap[("spectral_features", OTHER)].state == CORRUPT
    assert cheap[("spectral_features", OTHER)].reasons == (
        "notes.txt stray file (17 bytes, not in the manifest)",
    )
    (why,) = cheap[("base_spectrum", "tiny-test")].reasons
    assert why.startswith("base_spectrum.safetensors size 100 != ")
    assert not_fresh(assess(exp, instance, store, verify=CHEAP)).keys() == cheap.keys()

    full = not_fresh(assess(exp, instance, store, verify=FULL))
    assert set(full) == set(cheap) | {("adapter", EDITED)}
    assert full[("adapter", EDITED)].state == CORRUPT
    assert full[("adapter", EDITED)].reasons == (f"{WEIGHTS} sha256 mismatch",)

    plan = {(p.job, p.partition): p for p in plan_sweep(exp, full.values())}
    assert plan[("adapters_job", EDITED)].assets == ("adapter",)
    assert plan[("adapters_job", EDITED)].reason == f"adapter corrupt: {WEIGHTS} sha256 mismatch"
    assert "spectral_features corrupt: notes.txt stray file" in plan[("adapters_job", OTHER)].reason

    proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "sweep", "--dry-run", "--verify"],
        capture_output=True,
        text=True,
        cwd=TESTS_DIR.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"adapter corrupt: {WEIGHTS} sha256 mismatch" in proc.stdout
    assert "base_spectrum corrupt: base_spectrum.safetensors size 100 != " in proc.stdout
    cheap_proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "sweep", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=TESTS_DIR.parent,
    )
    assert cheap_proc.returncode == 0, cheap_proc.stderr[-2000:]
    assert "sha256 mismatch" not in cheap_proc.stdout
    assert "notes.txt stray file" in cheap_proc.stdout


def test_materialising_on_a_corrupt_input_fails_with_an_integrity_error(lab_copy):  # noqa: F811
    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    store = store_for(exp, lab_copy)
    flip_byte(store.local_path("adapter", EDITED) / WEIGHTS)
    planned = PlannedRun("adapters_job", EDITED, "features", assets=("spectral_features",))
    with pytest.raises(RunFailed) as e:
        run_planned(instance, exp, planned)
    msg = str(e.value)
    assert "IntegrityError" in msg or "do not match the manifest" in msg, msg
    assert f"adapter[{EDITED}]" in msg and f"{WEIGHTS} sha256" in msg
