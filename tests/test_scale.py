"""Past one device: the run axis sharded across (simulated) devices, units in threads, and units as Ray tasks, give
the same rows."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_script(script, out, *args, env=None):
    command = [sys.executable, script, "--preset", "smoke", "--out", str(out), *args]
    done = subprocess.run(command, cwd=ROOT, env=os.environ | (env or {}), capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def rows(path):
    lines = path.read_text().splitlines()
    return lines[0], sorted(lines[1:])


def test_sharded_runs_and_units_in_threads_give_the_rows_of_one_device_one_unit_at_a_time(smoke_results, tmp_path):
    """The smoke fixture ran in this process: one device, units two at a time (runner.JOBS)."""
    base, _ = smoke_results
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    sharded = run_script("run_unlearn_xxz.py", tmp_path / "two", "--parts", "phase,unlearn", "--jobs", "1", env=two)
    assert (execution(base / "xxz"), execution(sharded)) == ((1, 2), (2, 1))  # (devices, jobs)
    for table in ("phase.csv", "unlearn.csv"):
        assert rows(base / "xxz" / table) == rows(sharded / table)


def execution(folder):
    used = json.loads((folder / "config.json").read_text())["execution"]
    return used["devices"], used["jobs"]


def test_ray_gives_the_serial_rows_once_even_when_workers_die(smoke_results, tmp_path):
    pytest.importorskip("ray")
    base, _ = smoke_results
    markers = tmp_path / "killed"
    markers.mkdir()
    ray = run_script("run_unlearn_mnist.py", tmp_path / "ray", "--parts", "phase", "--ray",
                     env={"QMU_FAIL_ONCE_DIR": str(markers)})
    assert len(list(markers.iterdir())) == 4  # every unit's first attempt killed its worker, and was retried
    assert json.loads((ray / "config.json").read_text())["execution"]["ray_gcs"].startswith("127.0.0.1:")
    header, lines = rows(ray / "phase.csv")
    assert (header, lines) == rows(base / "mnist" / "phase.csv")  # the serial rows, from the smoke fixture
    assert len(lines) == len(set(lines))  # no unit written twice
