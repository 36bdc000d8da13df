"""`lab compare` reads two experiments' results from storage alone, with no Dagster instance.

The session's materialised small experiment is the first; the second is the same storage
copied under another experiment name (what another machine's run would have left in
the bucket). `DAGSTER_HOME` points at a directory that does not exist: nothing may
open an instance.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from lab_assets_tests.conftest import SMALL_EXPERIMENT


def test_compare_prints_headline_controls_and_adapters_of_two_experiments(small_lab, tmp_path):
    src_root = small_lab["root"] / "storage"
    root = tmp_path / "storage"
    shutil.copytree(src_root / "small", root / "small")
    shutil.copytree(src_root / "small", root / "small-b")
    text = SMALL_EXPERIMENT.read_text().replace("storage: ./storage-not-used", f"storage: {root}")
    a = tmp_path / "a.yaml"
    a.write_text(text)
    b = tmp_path / "b.yaml"
    b.write_text(text.replace("name: small", "name: small-b"))
    empty = tmp_path / "c.yaml"
    empty.write_text(text.replace("name: small", "name: never-built"))
    plot = tmp_path / "out" / "compare.png"
    env = {
        "PATH": "/usr/bin:/bin",
        "DAGSTER_HOME": str(tmp_path / "no-instance-here"),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab_assets.cli",
            "compare",
            str(a),
            str(b),
            str(empty),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("small", "small-b"):
        for target in ("method", "task"):
            assert any(
                line.startswith(name + " ") and f" {target} " in line for line in out.splitlines()
            ), out
    assert "never-built" in out and "not built" in out
    assert "norm / random / all" in out and "chance" in out
    # per-adapter held-out rows: both methods of both experiments, read from eval.json
    rows = [line.split() for line in out.splitlines() if line.startswith("small")]
    adapters = [r for r in rows if len(r) > 4 and r[2] in ("lora_sft", "dpo")]
    assert {(r[0], r[2]) for r in adapters} == {
        (n, m) for n in ("small", "small-b") for m in ("lora_sft", "dpo")
    }
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert not (tmp_path / "no-instance-here").exists()  # no Dagster instance was opened


def test_compare_names_a_missing_file_as_its_argument(tmp_path, capsys):
    from lab_assets.cli.main import main

    assert main(["compare", str(tmp_path / "nope.yaml"), str(SMALL_EXPERIMENT)]) != 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.yaml'}: experiment file not found (from lab compare's" in err
    assert "--experiment" not in err
