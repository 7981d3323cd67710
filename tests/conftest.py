"""Shared fixtures: small data sets, made once per test session, and a private XXZ cache."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QMU_CACHE", tempfile.mkdtemp(prefix="qmu-cache-"))


@pytest.fixture(scope="session")
def mnist():
    import datar

    return datar.mnist_data(num_train=200, seed=0, verbose=False)


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
