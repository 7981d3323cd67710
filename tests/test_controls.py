"""The controls of "Is the resilience quantum?": observables, ablations, defences, cross-validation, barrier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import controls
import methods
import fidelity
import models
import poison_unlearn as pu
from presets import QUICK_CV, merged
from tests.test_models import random_states


def test_meandiff_equals_the_closed_form_on_two_states():
    a, b = np.array([1.0, 0.0]), np.array([np.cos(0.4), np.sin(0.4)])
    train, ys = np.stack([a, b]), np.array([1, 0])
    probe = np.array([[np.cos(1.1), np.sin(1.1)]])
    m1, m0 = np.outer(a, a), np.outer(b, b)
    want = probe[0] @ (m1 - m0) @ probe[0]
    got = controls.meandiff_scores(controls.overlaps(probe, train), ys)
    np.testing.assert_allclose(got, [want], atol=1e-12)


@pytest.mark.parametrize("kind", [models.DiagonalObservable, models.UnitaryObservable])
@pytest.mark.parametrize("complex_inputs", [False, True])
def test_observables_are_bounded_hermitian_operators_read_by_the_logit(kind, complex_inputs, rng, precision):
    precision("complex128")
    model = kind(8, complex_inputs)  # 3 qubits
    params = model.init(jax.random.PRNGKey(3)) + jnp.asarray(rng.normal(size=model.init(jax.random.PRNGKey(0)).shape))
    op = np.asarray(model.operator(params))
    np.testing.assert_allclose(op, op.conj().T, atol=1e-10)
    spectrum = np.linalg.eigvalsh(op)
    assert spectrum.min() >= -1 - 1e-9 and spectrum.max() <= 1 + 1e-9
    if kind is models.UnitaryObservable:  # V^dag Z V: half the spectrum +1, half -1
        np.testing.assert_allclose(np.sort(spectrum), [-1] * 4 + [1] * 4, atol=1e-9)
    psi = random_states(rng, 5, 8) if complex_inputs else np.real(random_states(rng, 5, 8)) * 1.3
    want = 5 * np.real(np.einsum("bi,ij,bj->b", psi.conj(), op, psi))
    np.testing.assert_allclose(np.asarray(model.logits(params, model.prepare(psi))), want, atol=1e-9)


@pytest.mark.parametrize("complex_inputs", [False, True])
def test_the_unitary_observables_derivatives_are_those_of_its_projectors_quadratic_form(complex_inputs, rng,
                                                                                         precision):
    """The analytic tangent of ||P x||^2 (``models.projected_norms``) against autodiff of <x|2P - 1|x> through
    ``operator`` (a linear solve, no Cholesky factor): the loss's gradient, a forward-mode product (Gauss-Newton's),
    a Hessian-vector product (Newton's) and the gradient in the inputs."""
    precision("complex128")
    model = models.UnitaryObservable(16, complex_inputs)
    start = model.init(jax.random.PRNGKey(1))
    params = start + 0.3 * jnp.asarray(rng.normal(size=start.shape))  # well away from the identity
    psi = random_states(rng, 6, 16) if complex_inputs else np.real(random_states(rng, 6, 16)) * 1.3
    xs, ys, v = model.prepare(psi), jnp.asarray([0, 1, 1, 0, 1, 0]), jnp.asarray(rng.normal(size=params.shape))

    def reference(p, x):
        return 5 * jnp.real(jnp.einsum("bi,ij,bj->b", x.conj(), model.operator(p), x))

    def derivatives(logits):
        def loss(p, x):
            return jnp.mean(jax.nn.softplus(logits(p, x)) - ys * logits(p, x))

        return (jax.grad(loss)(params, xs), jax.jvp(lambda p: logits(p, xs), (params,), (v,))[1],
                jax.jvp(lambda p: jax.grad(loss)(p, xs), (params,), (v,))[1], jax.grad(loss, argnums=1)(params, xs))

    for ours, want in zip(derivatives(model.logits), derivatives(reference), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-7, atol=1e-9)


def test_the_unitary_observable_at_the_identity_reads_z_of_the_last_qubit(rng, precision):
    precision("complex128")
    model = models.UnitaryObservable(16, complex_inputs=True)
    scale = np.sqrt(model.column_entries)
    identity = model.init(jax.random.PRNGKey(0)) - 0.01 * scale * jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
    assert np.count_nonzero(np.asarray(identity).round(9)) == 8  # W = sqrt(32) (e_0, e_2, ..., e_14)
    psi = random_states(rng, 4, 16)
    probs = np.abs(psi) ** 2
    np.testing.assert_allclose(np.asarray(model.logits(identity, model.prepare(psi))) / 5,
                               probs[:, 0::2].sum(1) - probs[:, 1::2].sum(1), atol=1e-10)


@pytest.mark.parametrize("complex_inputs", [False, True])
def test_a_step_of_adam_turns_the_unitary_observables_columns_by_about_lr_at_every_size(complex_inputs, rng):
    """Adam moves every entry of W by about lr, so the columns' norm (``init``: sqrt(entries)) sets how far a step
    turns the projector; at unit columns the turn grew as lr * sqrt(entries) (see ``UnitaryObservable``)."""
    lr = 0.03
    for dim in (16, 1024):
        model = models.UnitaryObservable(dim, complex_inputs)
        params = model.init(jax.random.PRNGKey(dim))
        psi = random_states(rng, 8, dim) if complex_inputs else np.abs(random_states(rng, 8, dim))
        xs, ys = model.prepare(psi), jnp.asarray([0, 1] * 4)
        grad = jax.grad(lambda p: jnp.mean(models.bce(model.logits(p, xs), ys)))(params)
        optimiser = optax.adam(lr)
        step, _ = optimiser.update(grad, optimiser.init(params))
        columns = np.asarray(params).reshape(-1, dim // 2)
        turn = np.linalg.norm(np.asarray(step).reshape(-1, dim // 2), axis=0) / np.linalg.norm(columns, axis=0)
        assert 0.5 * lr < turn.min() and turn.max() < 1.5 * lr, (dim, turn.min(), turn.max())


def test_scale20_is_the_same_circuit_with_four_times_the_logits(rng):
    base, scaled = pu.build_model("qnn", "depth3", 16), pu.build_model("qnn", "depth3-scale20", 16)
    params = jnp.asarray(rng.normal(size=base.param_shape), models.real_dtype())
    psi = base.prepare(random_states(rng, 3, 16))
    np.testing.assert_allclose(scaled.logits(params, psi), 4 * base.logits(params, psi), rtol=1e-6)
    assert pu.build_model("qnn", "depth6-noent", 1024).param_shape == (6, 10, 3)  # 180 parameters


def test_each_defence_at_strength_zero_is_the_plain_recipe(mnist):
    xs, ys = mnist[0][:64], mnist[1][:64]
    model = models.MLP((8,), in_dim=xs.shape[1])
    params = model.init(jax.random.PRNGKey(0))
    batch, mask = {"x": model.prepare(xs), "y": jnp.asarray(ys)}, jnp.ones(64)
    zero = {"smooth": 0.0, "gce_q": 0.0, "weight_decay": 0.0}
    plain = models.Trainer(model)
    defended = models.Trainer(model, loss=models.defended_loss,
                              recipe=models.Recipe(weight_decay=True))
    assert models.defended_loss(defended, params, batch, mask, zero) == models.ce_loss(plain, params, batch, mask, {})
    logits = model.logits(params, batch["x"])
    np.testing.assert_allclose(models.generalised_ce(logits, batch["y"], 1e-7), models.bce(logits, batch["y"]),
                               rtol=1e-5)
    # training: at strength 0 the defended program trains as the plain one (to rounding: another fusion)
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 2), tree)
    data = {"x": jnp.stack([batch["x"]] * 2), "y": jnp.stack([batch["y"]] * 2)}
    plan = models.stack_plans([models.epoch_plan(np.random.default_rng(1), 64, 16, 3)] * 2)
    aux = {k: np.zeros(2, np.float32) for k in zero}
    shared = {"x_val": batch["x"], "y_val": batch["y"]}
    want = models.train_runs(plain, stack(params), data, plan, 0.01, shared=shared).params
    got = models.train_runs(defended, stack(params), data, plan, 0.01, aux=aux, shared=shared).params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    decayed = models.train_runs(defended, stack(params), data, plan, 0.01, shared=shared,
                                aux=aux | {"weight_decay": np.full(2, 0.5, np.float32)}).params
    assert not np.array_equal(decayed[0]["w"], want[0]["w"])


def test_early_stopping_at_the_last_epoch_is_plain_training_on_the_same_rows():
    cfg = merged(QUICK_CV, {"stop_epochs": [2]}) | {"defaults": {"weight_decay": 0.1, "label_smooth": 0.1,
                                                                  "gce": 0.7}}
    trained = [c for c in controls.candidates(cfg) if c[0] != "early_stop"]
    cells = [(0.3, 0, recipe, split) for recipe in trained for split in range(cfg["folds"] + 1)]
    epochs = 4
    metrics = {k: np.random.default_rng(0).random((len(cells), epochs)) for k in ("train_acc", "val_acc", "flip_fit")}
    metrics["held_acc"] = np.tile(np.arange(epochs) / epochs, (len(cells), 1))  # best at the last epoch
    picked = controls.DefenceRuns(cells, metrics, cfg, epochs).choices(0.3, 0)
    first_fold = cells.index((0.3, 0, ("plain", 0.0), 0))
    assert picked["early_stop"] == (f"epochs={epochs}", {k: pytest.approx(metrics[k][first_fold, -1], abs=1e-6)
                                                         for k in ("train_acc", "val_acc", "flip_fit")})


SMALL_CV = {"folds": 2, "ridge": [0.01, 1.0], "k": [1, 3, 9], "C": [0.1, 10.0], "weight_decay": [1.0],
            "label_smooth": [], "gce": [], "stop_epochs": [2],
            "defaults": {"weight_decay": 0.1, "label_smooth": 0.2, "gce": 0.7}}


def small_dataset(mnist, ys_val=None):
    xs, ys, xs_val, val = mnist
    rows = np.concatenate([np.flatnonzero(ys == 0)[:30], np.flatnonzero(ys == 1)[:30]])
    held = np.concatenate([np.flatnonzero(val == 0)[:20], np.flatnonzero(val == 1)[:20]])
    return pu.Dataset("mnist", "none", xs[rows], ys[rows], xs_val[held], val[held] if ys_val is None else ys_val, 784)


def test_cross_validation_never_reads_the_validation_labels(mnist):
    ds = small_dataset(mnist)
    permuted = small_dataset(mnist, np.random.default_rng(0).permutation(ds.ys_val))
    assert not np.array_equal(permuted.ys_val, ds.ys_val)
    kwargs = {"runs": 1, "seed": 3, "fid": fidelity.CORRECTED, "cv_cfg": SMALL_CV}
    specs = [({"model": "kernel", "arch": "ridge", "recipe": "tuned"}, controls.sklearn_unit),
             ({"model": "knn", "arch": "tuned", "recipe": "tuned"}, controls.sklearn_unit),
             ({"model": "linear", "arch": "pca", "recipe": "tuned", "match": "depth1"}, controls.sklearn_unit),
             ({"model": "mlp", "arch": "8", "recipe": "defences", "schedule": {"epochs": 3, "batch": 16, "lr": 0.01}},
              controls.defences_unit)]
    for spec, fit in specs:
        rows = [fit(d, spec, "label_flip", [0.3], **kwargs) for d in (ds, permuted)]
        assert [(r["recipe"], r["choice"], r["train_acc"], r["flip_fit"]) for r in rows[0]] == \
               [(r["recipe"], r["choice"], r["train_acc"], r["flip_fit"]) for r in rows[1]], spec


def test_the_operator_norm_barrier_of_a_hand_computed_pair():
    t = 0.3
    xs = np.array([[1.0, 0.0], [np.cos(t), np.sin(t)], [1.0, 0.0]])
    assert controls.operator_norm_barrier(xs, np.array([1, 0, 1])) == pytest.approx(1 / np.sin(t))
    # unnormalised states: 2 / sqrt((|a|^2 + |b|^2)^2 - 4 |<a|b>|^2)
    a, b = np.array([2.0, 0.0]), np.array([0.0, 1.0])
    assert controls.operator_norm_barrier(np.stack([a, b]), np.array([1, 0])) == pytest.approx(2 / 5)


def test_an_mlp_fits_ten_random_labels_exactly(mnist):
    ds = small_dataset(mnist)
    spec = {"model": "mlp", "arch": "32", "recipe": "plain", "schedule": {"epochs": 100, "batch": 10, "lr": 0.01}}
    rows = controls.memorise_unit(ds, spec, n_trains=[10], runs=2, factor=2, seed=0, fid=fidelity.CORRECTED)
    assert [r["random_fit"] for r in rows] == [1.0, 1.0]
    labels = [s[1] for s in controls.random_label_sets(ds, 10, 2, 0)]
    assert 0 < np.mean(labels) < 1 and not np.array_equal(*labels)


def test_every_unlearning_method_runs_on_the_unitary_observable_of_complex_states(xxz8, precision):
    """The unlearning study of the QNN's function class (paper preset): every registered method and the teacher's
    poison, on 4-spin-sized complex states (the observable's code path at a size the suite affords)."""
    xs, ys, xv, yv = (a for a in xxz8[:4])
    small = pu.Dataset("xxz", "random", xs[:, :16] / np.linalg.norm(xs[:, :16], axis=1, keepdims=True), ys,
                       xv[:, :16] / np.linalg.norm(xv[:, :16], axis=1, keepdims=True), yv, 16)
    study = pu.Study("observable", "unitary", "label_flip", 0.3, pu.Schedule(20, None, 0.05),
                     pu.Schedule(2, None, 0.01))
    pop = pu.train_teachers(small, study, runs=2, seed=0, fid=fidelity.CORRECTED, shared_teacher=False)
    rows, outcomes = pu.unlearn_unit(small, study, pop, method_names=list(methods.METHODS), seed=0,
                                     fid=fidelity.CORRECTED)
    assert set(outcomes) == set(methods.METHODS)
    assert all(np.isfinite(r["val_acc"]) and np.isfinite(r["forget_poison_acc"]) for r in rows)
    assert {r["recipe"] for r in rows} == {"plain"}
