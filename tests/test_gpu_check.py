"""benchmarks/gpu_check.sh --dry-run: every step runs at tiny sizes on the CPU and is recorded with its log."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("nvidia_smi", "env", "wheels", "data", "tests", "bench_sampler", "bench_train_step", "train_rts_cnn",
         "train_rts_st_cnn_affine", "train_summary")
# Skipped on a machine without an NVIDIA driver, or without the (git-ignored) folder of wheels.
MAY_SKIP = {"nvidia_smi", "wheels"}


@pytest.mark.slow  # 75-85 s on the project's 2-core machine
def test_dry_run_records_every_step_with_its_log(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not available: benchmarks/gpu_check.sh is a bash script")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run([bash, "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "status", "seconds", "note"], rows[0]
    status = {row[0]: row[1] for row in rows[1:]}
    assert tuple(status) == STEPS, result.stdout + result.stderr
    for step, code in status.items():
        log = out / "logs" / f"{step}.log"
        assert log.is_file(), step
        assert code == "0" or (code == "skipped" and step in MAY_SKIP), f"{step}: {code}\n{log.read_text()[-3000:]}"
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"results in {out}" in result.stdout
    assert "## versions" in (out / "env.txt").read_text()
    for name in ("sampler.json", "train_step.json", "tests.xml"):
        assert (out / name).is_file(), name
    runs = (out / "runs.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in runs[1:]] == [["rts_cnn", "2"], ["rts_st_cnn_affine", "2"]], runs
