"""--plan: it writes nothing, counts the units a run performs, and predicts the smoke run's time within 3x."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import units

PARTS = "phase"  # a cold smoke run of it takes about 20 s on the 2-core CPU


def script(*argv, cache):
    env = os.environ | {"QMU_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "run_unlearn_xxz.py", "--preset", "smoke", "--parts", PARTS, *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def seconds(text):
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def plan_lines(stdout):
    """part -> (units, trainings, sample-gradients, compiles, predicted seconds) of the plan's table."""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"(\w+)\s+(\d+)\s+(\d+)\s+([\d.e+]+)\s+(\d+)\s+([\d.]+ (?:s|min|h))$", line.strip())
        if m:
            found[m[1]] = (int(m[2]), int(m[3]), float(m[4]), int(m[5]), seconds(m[6]))
    return found


@pytest.fixture(scope="module")
def planned_and_run(tmp_path_factory):
    """The plan of the smoke parts, then the run itself, each from its own empty cache (cold compilation)."""
    base = tmp_path_factory.mktemp("plan")
    planned = plan_lines(script("--plan", "--out", str(base / "planned"), cache=base / "cache-plan"))
    script("--out", str(base / "run"), cache=base / "cache-run")
    return base, planned


def test_the_plan_writes_nothing(planned_and_run):
    base, planned = planned_and_run
    assert not (base / "planned").exists()
    assert set(planned) == {*PARTS.split(","), "total"}


def test_the_plan_counts_the_units_a_run_performs(planned_and_run):
    base, planned = planned_and_run
    for part in PARTS.split(","):
        spec = units.PARTS[part]
        with open(base / "run" / spec.file) as f:
            keys = {spec.unit_key(row) for row in csv.DictReader(f)}
        assert planned[part][0] == len(keys), part
        assert planned[part][1] > 0 and planned[part][2] > 0 and planned[part][3] > 0


def test_the_predicted_time_is_within_a_factor_of_3(planned_and_run):
    base, planned = planned_and_run
    measured = sum(json.loads((base / "run" / "config.json").read_text())["wall_s"].values())
    predicted = planned["total"][4]
    assert measured / 3 <= predicted <= 3 * measured, (predicted, measured)
