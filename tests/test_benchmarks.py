"""The benchmark scripts still drive today's code: a renamed trainer attribute once made every method case of
bench_tune.py fail, and it was found only on a GPU machine. One tiny case each, in the scripts' own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parents[1]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_bench_tune_counts_and_times_a_training_step_of_each_vit_method():
    report = _run("bench_tune.py", "--device", "cpu", "--method", "spt", "--method", "vpt", "--backbone", "test_vit",
                  "--classes", "3", "--batch", "2", "--steps", "1", "--warmup", "1", "--no-baselines")
    for method in ("spt", "vpt"):
        case = report["results"]["vit"]["cases"][method]
        assert "error" not in case, case.get("error")
        assert case["step"]["median_ms"] > 0
        parts = case["aten_ops_breakdown"]
        assert sum(parts.values()) == case["aten_ops_per_step"] > 100
        assert parts["forward: rest of the loss"] > 0 and parts["optimizer step"] > 0
        assert case["frozen_tensors_cast"] == 0  # the CPU keeps fp32 weights


def test_bench_tune_loader_only_reads_the_training_loader():
    report = _run("bench_tune.py", "--loader-only", "--data-classes", "2", "--images-per-class", "4", "--batch", "4",
                  "--epochs", "2", "--rounds", "1", "--workers", "0")
    (cached,), (decoded,) = report["results"]["cache"], report["results"]["decode"]
    assert (cached["cached"], decoded["cached"]) == (True, False)
    for run in (cached, decoded):
        assert run["images"] == 8 and [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert run["steady_state"]["images_per_s"] > 0
