"""Hessian tools against exact linear algebra on a model small enough for both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian
import models


@pytest.fixture(scope="module")
def problem():
    models.set_precision("complex128")
    rng = np.random.default_rng(0)
    model = models.MLP((6,), in_dim=8)
    xs = jnp.asarray(rng.normal(size=(40, 8)))
    ys = jnp.asarray(rng.integers(0, 2, 40))
    params = model.init(jax.random.PRNGKey(0))
    loss, w = hessian.flat_loss(model, params, xs, ys)
    yield hessian.Landscape(model), params, xs, ys, loss, w, np.asarray(models.exact_hessian(loss, w))
    models.set_precision("complex64")


def test_hvp_equals_exact_hessian_times_vector(problem):
    *_, loss, w, h = problem
    v = jax.random.normal(jax.random.PRNGKey(1), w.shape, w.dtype)
    np.testing.assert_allclose(models.hvp(loss, w, v), h @ np.asarray(v), atol=1e-10)
    np.testing.assert_allclose(h, h.T, atol=1e-12)


def test_lanczos_top_eigenvalues_match_eigvalsh(problem):
    *_, loss, w, h = problem
    exact = np.linalg.eigvalsh(h)[::-1]
    start = jax.random.normal(jax.random.PRNGKey(2), w.shape, w.dtype)
    tri = hessian.lanczos(lambda v: models.hvp(loss, w, v), start, 30)
    ritz = np.linalg.eigvalsh(np.asarray(tri))[::-1]
    np.testing.assert_allclose(ritz[:3], exact[:3], rtol=1e-6)  # extreme eigenvalues converge first


def test_slq_and_hutchinson_traces_agree_with_exact(problem):
    *_, w, h = problem
    model, params, xs, ys, *_ = problem
    exact = np.trace(h)
    starts = hessian.rademacher(jax.random.PRNGKey(3), 400, len(w), w.dtype)
    nodes, weights = hessian.quadrature(hessian.lanczos_tridiagonals(model, params, xs, ys, starts, len(w)))
    slq_trace = len(w) * np.mean(np.sum(weights * nodes, axis=1))
    zs = hessian.rademacher(jax.random.PRNGKey(4), 400, len(w), w.dtype)
    hutch = float(np.mean(hessian.quadratic_forms(model, params, xs, ys, zs)))
    spread = np.sqrt(2 * np.sum(h**2) / 400)  # std of Hutchinson's estimator with 400 Rademacher probes
    assert abs(hutch - exact) < 4 * spread
    assert abs(slq_trace - exact) < 4 * spread * 1.5
    np.testing.assert_allclose(np.sum(weights, axis=1), 1, atol=1e-8)


def test_analyse_exact_and_lanczos_paths_agree(problem, monkeypatch):
    model, params, xs, ys, *_ = problem
    exact = hessian.analyse(model, params, xs, ys, jax.random.PRNGKey(5))
    monkeypatch.setattr(hessian, "EXACT_MAX_PARAMS", 0)
    approx = hessian.analyse(model, params, xs, ys, jax.random.PRNGKey(5), lanczos_steps=40, probes=300)
    summed = hessian.analyse(model, params, xs, ys, jax.random.PRNGKey(5), lanczos_steps=40, trace="exact")
    assert exact["method"] == "exact" and approx["method"] == "lanczos"
    np.testing.assert_allclose(approx["top_eigs"][:2], exact["top_eigs"][:2], rtol=1e-5)
    assert approx["trace"] == pytest.approx(exact["trace"], rel=0.25)
    assert summed["trace"] == pytest.approx(exact["trace"], rel=1e-9)  # the sum of e_j.H e_j is exact


def test_complex_parameter_hessian_doubles_the_space_and_keeps_the_real_block(precision):
    """The authors' QNN Hessian is over [Re theta; Im theta]; its real block is the ordinary Hessian."""
    precision("complex128")
    rng = np.random.default_rng(1)
    model = models.QNN(3, 2, "cnot")
    xs = model.prepare(rng.normal(size=(6, 8)) / np.sqrt(8))
    ys = jnp.asarray(rng.integers(0, 2, 6))
    params = model.init(jax.random.PRNGKey(2)) + 0.5
    real = np.asarray(hessian.hessian_matrix(hessian.Landscape(model), params, xs, ys))
    both = np.asarray(hessian.hessian_matrix(hessian.Landscape(model, complex_params=True), params, xs, ys))
    size = real.shape[0]
    assert both.shape == (2 * size, 2 * size)
    np.testing.assert_allclose(both[:size, :size], real, atol=1e-10)
    assert np.abs(both[size:, size:]).max() > 1e-3  # the imaginary directions bend the loss too


def test_spectral_density_integrates_to_one():
    grid = np.linspace(-5, 5, 2001)
    density = hessian.spectral_density(np.array([[-1.0, 0.5, 2.0]]), np.array([[0.2, 0.3, 0.5]]), grid, 0.1)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
