"""Resilience sweep, unlearning methods and weight sweeps on tiny problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import poison_unlearn as pu


@pytest.fixture(scope="module")
def tiny(mnist):
    xs, ys, xv, yv = mnist
    train = np.concatenate([np.flatnonzero(ys == c)[:40] for c in (0, 1)])
    val = np.concatenate([np.flatnonzero(yv == c)[:30] for c in (0, 1)])
    return pu.Dataset("mnist", "none", xs[train], ys[train], xv[val], yv[val])


@pytest.fixture(scope="module")
def study():
    return pu.Study("mlp", "16", "label_flip", 0.3, pu.Schedule(60, 16, 0.02), pu.Schedule(4, None, 0.005))


@pytest.fixture(scope="module")
def teacher(tiny, study):
    return pu.train_teachers(tiny, study, runs=2, seed=0)


def test_resilience_unit_rows_and_determinism(tiny):
    args = (tiny, "mlp", "8", "label_flip", [0.0, 0.5], 2, pu.Schedule(3, 32, 0.01), 7)
    rows = pu.resilience_unit(*args)
    assert [(r["alpha"], r["run"]) for r in rows] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    assert all(0 <= r[m] <= 1 for r in rows for m in ("train_acc", "val_acc"))
    assert rows == pu.resilience_unit(*args)
    assert rows != pu.resilience_unit(*args[:-1], 8)


def test_both_models_see_the_same_poison(tiny):
    _, ys_a, idx_a = pu.poisoned_copy(tiny, "label_flip", 0.3, 0, 1)
    _, ys_b, idx_b = pu.poisoned_copy(tiny, "label_flip", 0.3, 0, 1)
    np.testing.assert_array_equal(idx_a, idx_b)
    assert not np.array_equal(idx_a, pu.poisoned_copy(tiny, "label_flip", 0.3, 0, 2)[2])


def test_bernoulli_kl_zero_for_equal_outputs_and_matches_hand_computation():
    a = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(pu.bernoulli_kl(a, a), 0, atol=1e-7)
    p, q = 1 / (1 + np.exp(-0.7)), 1 / (1 + np.exp(1.2))
    hand = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert float(pu.bernoulli_kl(jnp.array(0.7), jnp.array(-1.2))) == pytest.approx(hand, rel=1e-5)


def method_runs(tiny, study, teacher, method, kl_w=0.0, fo_w=0.0, epochs=None):
    model, params, inputs = teacher
    keys = jnp.stack([pu.prng_key(0, "test", r) for r in range(2)])
    schedule = study.unlearn if epochs is None else pu.Schedule(epochs, None, study.unlearn.lr)
    return pu.unlearn_runs(model, method, params, inputs, pu.shared_validation(model, tiny), keys, schedule,
                           kl_w, fo_w)


def test_epoch_zero_is_the_teacher_except_for_retrain(tiny, study, teacher):
    model, params, (data, aux) = teacher
    want = jax.vmap(lambda p, x, y: models.accuracy(model, p, x, y))(params, aux["forget_x"], aux["forget_y"])
    for method in ("finetune", "scrub", "grad_ascent"):
        np.testing.assert_allclose(method_runs(tiny, study, teacher, method, 0.1, 0.2)["forget_acc"][:, 0], want)
    fresh = method_runs(tiny, study, teacher, "retrain")
    assert fresh["train_acc"][:, 0].max() < 0.8  # a fresh initialisation has not learned the set


def test_zero_weights_reduce_scrub_and_grad_ascent_to_finetune(tiny, study, teacher):
    finetune = method_runs(tiny, study, teacher, "finetune")
    for method in ("scrub", "grad_ascent"):
        other = method_runs(tiny, study, teacher, method)
        for metric in pu.UNLEARN_METRICS:
            np.testing.assert_allclose(other[metric], finetune[metric], atol=1e-6)


def test_grad_ascent_lowers_memorised_poison(tiny, study, teacher):
    metrics = method_runs(tiny, study, teacher, "grad_ascent", fo_w=1.0, epochs=20)
    assert metrics["forget_poison_acc"][:, 0].min() >= 0.9  # the teacher memorised the flipped labels
    assert np.all(metrics["forget_poison_acc"][:, -1] < metrics["forget_poison_acc"][:, 0] - 0.3)


def test_unlearn_unit_rows_oracle_and_metrics(tiny, study, teacher):
    rows, wall = pu.unlearn_unit(tiny, study, 2, 0, teacher=teacher)
    assert set(wall) == set(pu.METHODS)
    assert len(rows) == 4 * 2 * (study.unlearn.epochs + 1)
    assert all(r["oracle_agree"] == 1.0 for r in rows if r["method"] == "retrain")
    assert all(0 <= r[m] <= 1 for r in rows for m in pu.UNLEARN_METRICS)
    assert pu.unlearn_unit(tiny, study, 2, 0, teacher=teacher)[0] == rows  # recomputing a unit: same rows


def test_weight_sweep_compiles_once(tiny, study, teacher):
    rows = pu.sweep_unit(tiny, study, "scrub", 0.0, [0.0, 0.5], 2, 0, teacher=teacher)
    before = models.TRACE_COUNT["fit"]
    again = pu.sweep_unit(tiny, study, "scrub", 0.7, [0.0, 0.5], 2, 0, teacher=teacher)
    assert models.TRACE_COUNT["fit"] == before
    assert [(r["fo_w"], r["run"]) for r in rows] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    assert {r["kl_w"] for r in again} == {0.7}
