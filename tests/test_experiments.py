"""Resilience sweep, teachers, the method registry and its exact reductions, sweeps, on tiny problems."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import fidelity
import methods
import models
import poison_unlearn as pu
import units

RNG_OF = pu.draw_rng(0)


@pytest.fixture(scope="module")
def tiny(mnist):
    xs, ys, xv, yv = mnist
    train = np.concatenate([np.flatnonzero(ys == c)[:40] for c in (0, 1)])
    val = np.concatenate([np.flatnonzero(yv == c)[:30] for c in (0, 1)])
    return pu.Dataset("mnist", "none", xs[train], ys[train], xv[val], yv[val], raw_dim=784)


@pytest.fixture(scope="module")
def study():
    return pu.Study("mlp", "16", "label_flip", 0.3, pu.Schedule(60, 16, 0.02), pu.Schedule(4, None, 0.005))


@pytest.fixture(scope="module")
def pop(tiny, study):
    return pu.train_teachers(tiny, study, runs=2, seed=0, fid=fidelity.CORRECTED, shared_teacher=False)


def run(name, pop, study, **kwargs):
    return methods.run_method(name, pop, RNG_OF, schedule=kwargs.pop("schedule", study.unlearn),
                              recipe=models.ENGINE, **kwargs)


def assert_same(a, b, atol=1e-6):
    """Equal up to float32 rounding (the programs differ, so XLA may order a few sums differently)."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def test_resilience_unit_rows_and_determinism(tiny):
    kwargs = {"runs": 2, "schedule": pu.Schedule(3, 32, 0.01), "seed": 7, "fid": fidelity.CORRECTED}
    rows = pu.resilience_unit(tiny, "mlp", "8", "label_flip", [0.0, 0.5], **kwargs)
    assert [(r["alpha"], r["run"]) for r in rows] == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    by_alpha = {a: np.mean([r["train_acc"] for r in rows if r["alpha"] == a]) for a in (0.0, 0.5)}
    assert by_alpha[0.0] > by_alpha[0.5] + 0.2  # clean labels are learnable; half of them flipped are not
    again = pu.resilience_unit(tiny, "mlp", "8", "label_flip", [0.0, 0.5], **kwargs)
    assert pd.DataFrame(rows).equals(pd.DataFrame(again))  # NaN flip_fit at alpha 0 compares equal here
    other = pu.resilience_unit(tiny, "mlp", "8", "label_flip", [0.0, 0.5], **kwargs | {"seed": 8})
    assert not pd.DataFrame(rows).equals(pd.DataFrame(other))
    assert all(np.isnan(r["flip_fit"]) for r in rows if r["alpha"] == 0)
    assert all(0 <= r["flip_fit"] <= 1 for r in rows if r["alpha"] > 0)


def test_both_models_see_the_same_poison(tiny, study):
    """The QNN's and the MLP's teachers of a study are trained on the same poisoned rows, run by run."""
    qnn = dataclasses.replace(study, model="qnn", arch="depth1", teacher=pu.Schedule(1, 80, 0.01))
    mlp = dataclasses.replace(study, teacher=pu.Schedule(1, 80, 0.01))
    pops = [pu.train_teachers(tiny, s, runs=2, seed=0, fid=fidelity.CORRECTED, shared_teacher=False)
            for s in (qnn, mlp)]
    for key in ("forget_idx", "trained_y", "retain_y"):
        np.testing.assert_array_equal(pops[0].inputs[key], pops[1].inputs[key])
    assert not np.array_equal(pops[0].inputs["forget_idx"][0], pops[0].inputs["forget_idx"][1])


def test_shared_teacher_versus_a_teacher_per_run(tiny, study, pop):
    shared = pu.train_teachers(tiny, study, runs=3, seed=0, fid=fidelity.PAPER, shared_teacher=True)
    assert_same(models.take_runs(shared.params, 0), models.take_runs(shared.params, 2))  # one teacher, one draw
    np.testing.assert_array_equal(shared.inputs["forget_idx"][0], shared.inputs["forget_idx"][2])
    assert not np.array_equal(pop.inputs["forget_idx"][0], pop.inputs["forget_idx"][1])  # ours: own draw each
    assert len(set(map(tuple, shared.draws))) == 3  # runs still differ in their unlearning draws


def test_scrub_forget_inputs_follow_fidelity_item_d(tiny, study):
    features = dataclasses.replace(study, poison="feature_randomization")
    clean = pu.train_teachers(tiny, features, runs=1, seed=0, fid=fidelity.PAPER, shared_teacher=True).inputs
    ours = pu.train_teachers(tiny, features, runs=1, seed=0, fid=fidelity.CORRECTED, shared_teacher=True).inputs
    np.testing.assert_array_equal(clean["kl_x"], clean["forget_x"])
    np.testing.assert_array_equal(ours["kl_x"], ours["trained_x"])
    assert not np.array_equal(clean["forget_x"], clean["trained_x"])


@pytest.mark.parametrize("fid, dtype", [(fidelity.PAPER, np.float32), (fidelity.CORRECTED, np.float64)],
                         ids=["paper", "corrected"])
def test_mlp_precision_follows_fidelity_item_j(tiny, study, precision, fid, dtype):
    """Under --dtype complex128 the authors' Keras MLP still trains in float32 (Keras' default floatx); ours follows
    --dtype. Every kind of method (losses, masks, one-shot steps) keeps the teacher's precision."""
    precision("complex128")
    short = dataclasses.replace(study, teacher=pu.Schedule(2, 16, 0.02))
    teachers = pu.train_teachers(tiny, short, runs=2, seed=0, fid=fid, shared_teacher=False)
    assert teachers.inputs["retain_x"].dtype == dtype and models.param_dtype(teachers.params) == dtype
    for name in ("scrub", "eu_k", "salun", "newton", "fisher"):
        params = run(name, teachers, short, every_epoch=False).params
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(dtype)}, name
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)), name


@pytest.mark.parametrize("fid, dtype, names", [
    (fidelity.PAPER, np.float32, ("finetune", "scrub", "eu_k", "salun", "newton", "fisher")),  # logits are float64
    (fidelity.CORRECTED, np.float64, ("finetune",))], ids=["paper", "corrected"])
def test_qnn_parameter_precision_follows_fidelity_item_l(tiny, precision, fid, dtype, names):
    """Under --dtype complex128 the authors' QNN parameters were float32 (TensorCircuit's implicit_randn) on
    complex128 states; ours follow --dtype. Training and a one-shot step keep the parameters' precision."""
    precision("complex128")
    qnn = pu.Study("qnn", "depth1", "label_flip", 0.3, pu.Schedule(2, 16, 0.02), pu.Schedule(2, None, 0.005))
    teachers = pu.train_teachers(tiny, qnn, runs=2, seed=0, fid=fid, shared_teacher=False)
    assert models.param_dtype(teachers.params) == dtype and teachers.inputs["retain_x"].dtype == np.complex128
    for name in names:
        params = run(name, teachers, qnn, every_epoch=False).params
        assert params.dtype == dtype and np.isfinite(params).all(), name


def test_item_k_gives_the_mlp_keras_adam_under_paper_and_optax_otherwise():
    for stage in ("train", "unlearn"):
        assert fidelity.PAPER.recipe("mlp", stage).optimizer is models.keras_adam
        assert fidelity.CORRECTED.recipe("mlp", stage).optimizer is models.optax_adam
        assert fidelity.PAPER.recipe("qnn", stage).optimizer is models.optax_adam  # the QNN was never Keras
    before_k = {k: v for k, v in fidelity.PAPER.as_dict().items() if k != "mlp_optimizer"}
    assert fidelity.Fidelity(**before_k).recipe("mlp", "train").optimizer is models.optax_adam


def test_results_written_before_item_j_read_as_dtype_precision():
    """A config.json from before item j has no ``mlp_precision``: its MLPs followed --dtype, and still read so."""
    old = {k: v for k, v in fidelity.PAPER.as_dict().items() if k != "mlp_precision"}
    assert fidelity.Fidelity(**old).mlp_dtype is None and fidelity.PAPER.mlp_dtype == "float32"


def test_epoch_zero_is_the_teacher_except_for_fresh_starts(pop, study):
    model = pop.model
    want = jax.vmap(lambda p, x, y: models.accuracy(model, p, x, y))(pop.params, pop.inputs["forget_x"],
                                                                     pop.inputs["forget_y"])
    for name in ("finetune", "scrub", "grad_ascent", "salun", "bad_teacher"):
        np.testing.assert_allclose(run(name, pop, study).metrics["forget_acc"][:, 0], want)
    assert run("retrain", pop, study).metrics["train_acc"][:, 0].max() < 0.8  # fresh: has not learned the set


def test_zero_weights_reduce_scrub_and_grad_ascent_to_finetune(pop, study):
    finetune = run("finetune", pop, study)
    for name in ("scrub", "grad_ascent"):
        other = run(name, pop, study, hp={"fo_w": 0.0})
        for metric in methods.UNLEARN_METRICS:
            np.testing.assert_allclose(other.metrics[metric], finetune.metrics[metric], atol=1e-6)


def test_neggrad_plus_with_beta_one_is_finetune(pop, study):
    assert_same(run("neggrad_plus", pop, study, hp={"beta": 1.0}).params, run("finetune", pop, study).params)


def test_eu_k_over_all_layers_is_retrain_from_the_same_key(pop, study):
    assert_same(run("eu_k", pop, study, hp={"k": 2}).params, run("retrain", pop, study).params)
    partial = run("eu_k", pop, study, hp={"k": 1}).params
    assert_same(partial[0], pop.params[0])  # the first Dense layer stays frozen
    assert not np.allclose(partial[1]["w"], pop.params[1]["w"])


def test_salun_keeping_every_weight_is_random_labels(pop, study):
    assert_same(run("salun", pop, study, hp={"gamma": 1.0}).params, run("random_labels", pop, study).params)


def test_salun_updates_exactly_the_most_salient_fraction(pop, study):
    mask, teacher = methods.saliency_mask(pop, {"gamma": np.array([0.5, 0.5])}), pop.params
    flat = jax.vmap(lambda tree: jax.flatten_util.ravel_pytree(tree)[0])  # (runs, parameters)
    grads = flat(jax.vmap(jax.grad(lambda p, x, y: jnp.mean(models.bce(pop.model.logits(p, x), y))))(
        teacher, pop.inputs["trained_x"], pop.inputs["trained_y"]))
    assert (grads == 0).mean() > 0.5  # zero-padded pixels and dead units: a quantile threshold would keep all
    grads, kept = np.asarray(grads), np.asarray(flat(mask)) > 0
    np.testing.assert_array_equal(kept.sum(axis=1), np.round(0.5 * kept.shape[1]))
    assert all(np.abs(g)[k].min() >= np.abs(g)[~k].max() for g, k in zip(grads, kept))
    moved = np.asarray(flat(run("salun", pop, study).params) != flat(teacher))
    assert not moved[~kept].any()


def test_bad_teacher_with_a_competent_teacher_everywhere_leaves_the_teacher(pop, study):
    """Distilling the teacher into itself: the gradient at the teacher vanishes (first order); with the
    incompetent teacher on the forget rows it does not. (Adam would turn rounding-level gradients into
    lr-sized steps, so the gradient itself is checked.)"""
    first = models.take_runs((pop.params, pop.inputs), 0)
    trainer = models.Trainer(pop.model)

    def gradient_norm(rows_name):
        rows = models.take_runs(methods.ROWS[rows_name](pop, RNG_OF), 0)
        aux = first[1] | {"hp": methods.bad_teacher_weights({})}
        grads = jax.grad(methods.joined_loss, argnums=1)(trainer, first[0], rows, jnp.ones(rows["y"].shape[0]), aux)
        return float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grads)[0]))

    assert gradient_norm("joined") < 1e-5  # forget rows keep the teacher's own logits
    assert gradient_norm("bad_teacher") > 1e-2


def test_grad_ascent_lowers_memorised_poison(pop, study):
    metrics = run("grad_ascent", pop, study, hp={"fo_w": 1.0}, schedule=pu.Schedule(20, None, 0.005)).metrics
    assert metrics["forget_poison_acc"][:, 0].min() >= 0.9  # the teacher memorised the flipped labels
    assert np.all(metrics["forget_poison_acc"][:, -1] < metrics["forget_poison_acc"][:, 0] - 0.3)


def test_minmax_plan_max_steps_only_in_the_first_epochs():
    plan = methods.minmax_plan(np.random.default_rng(0), 10, 4, 8, epochs=3, msteps=2, forget_lr=0.5)
    forget_steps = plan["idx"][:, :1]
    assert np.all(forget_steps[plan["mask"][:, :1]] >= 10)  # forget rows come after the retain rows
    assert plan["mask"][:2, 0].sum() == 8 and plan["mask"][2, 0].sum() == 0  # an empty step in epoch 3
    np.testing.assert_array_equal(plan["scale"][:, 0], 0.5)
    assert plan["mask"][:, 1:].sum() == 30  # then every retain row once per epoch


def logistic_population(rng, n=600, n_forget=12):
    """A logistic regression (an MLP without hidden layers) at the optimum of all its data, as a population."""
    models.set_precision("complex128")
    model = models.MLP((), in_dim=3)
    xs = rng.normal(size=(n, 3))
    ys = (rng.random(n) < 1 / (1 + np.exp(-xs @ np.array([1.5, -2.0, 0.5])))).astype(np.int32)

    def optimum(x, y):
        params = model.init(jax.random.PRNGKey(0))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        for _ in range(30):  # Newton's method (Gauss-Newton = Hessian here)
            flat = methods.newton_update(lambda w: model.logits(unravel(w), x), models.bce, y, flat, 0.0)
        return unravel(flat)

    x, y = jnp.asarray(xs), jnp.asarray(ys)
    teacher = optimum(x, y)
    retained = optimum(x[n_forget:], y[n_forget:])
    inputs = {"retain_x": x[n_forget:], "retain_y": y[n_forget:], "retain_t": model.logits(teacher, x[n_forget:]),
              "forget_x": x[:n_forget], "forget_y": y[:n_forget], "trained_x": x[:n_forget],
              "trained_y": y[:n_forget], "trained_t": model.logits(teacher, x[:n_forget]),
              "kl_x": x[:n_forget], "kl_t": model.logits(teacher, x[:n_forget]), "forget_idx": jnp.arange(n_forget)}
    def one_run(tree):
        return jax.tree.map(lambda a: a[None], tree)

    pop = methods.Population(model, one_run(teacher), one_run(inputs), {"x_val": x, "y_val": y}, [("logistic",)])
    return pop, teacher, retained


def test_newton_step_on_logistic_regression_lands_on_retraining(rng):
    try:
        pop, teacher, retained = logistic_population(rng)
        moved = methods.run_method("newton", pop, RNG_OF, schedule=pu.Schedule(1, None, 0.1), recipe=models.ENGINE,
                                   hp={"damping": 0.0}).params
        gap = jax.flatten_util.ravel_pytree(retained)[0] - jax.flatten_util.ravel_pytree(teacher)[0]
        miss = jax.flatten_util.ravel_pytree(jax.tree.map(lambda a: a[0], moved))[0] - \
            jax.flatten_util.ravel_pytree(retained)[0]
        assert float(jnp.linalg.norm(miss)) < 0.05 * float(jnp.linalg.norm(gap))  # the error is second order
    finally:
        models.set_precision("complex64")


@pytest.mark.parametrize("features", [6, 60], ids=["direct", "conjugate-gradients"])
def test_newton_update_on_a_logistic_regression_is_the_damped_newton_step(features, precision):
    precision("complex128")
    rng = np.random.default_rng(features)
    x, w = jnp.asarray(rng.normal(size=(400, features))), jnp.asarray(rng.normal(size=features) / features)
    y = jnp.asarray((rng.random(400) < 0.5).astype(np.int32))
    def loss(w):
        return jnp.mean(models.bce(x @ w, y))

    expected = w - np.linalg.solve(jax.hessian(loss)(w) + 0.1 * np.eye(features), jax.grad(loss)(w))
    np.testing.assert_allclose(methods.newton_update(lambda w: x @ w, models.bce, y, w, 0.1), expected, atol=1e-8)


def test_newton_step_of_a_low_rank_system_is_finite():
    """The smoke XXZ MLP teacher: its Gauss-Newton system is low-rank, CG converges within a few steps, and
    stepping on past convergence divided 0 by 0 (NaN parameters, seen only as odd accuracies)."""
    import run_unlearn_xxz

    settings = run_unlearn_xxz.SMOKE | {"seed": 0, "fidelity": fidelity.PAPER.as_dict()}
    ctx = units.Context(settings, run_unlearn_xxz.load, run_unlearn_xxz.study_data)
    study = next(s for s in ctx.studies() if s.model == "mlp")
    moved = methods.run_method("newton", ctx.population(study), RNG_OF, schedule=study.unlearn,
                               recipe=ctx.fid.recipe("mlp", "unlearn"), every_epoch=False).params
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(moved))


def test_gauss_newton_matrix_of_a_relu_net_is_jacobian_weighted_and_positive(precision):
    precision("complex128")
    rng = np.random.default_rng(3)
    model = models.MLP((4, 2), in_dim=5)
    flat, unravel = jax.flatten_util.ravel_pytree(model.init(jax.random.PRNGKey(1)))
    x, y = jnp.asarray(rng.normal(size=(50, 5))), jnp.asarray(rng.integers(0, 2, 50))
    def logits_of(w):
        return model.logits(unravel(w), x)

    grad, product = methods.gauss_newton(logits_of, models.bce, y, flat)
    matrix = np.asarray(jax.vmap(product)(jnp.eye(flat.size)))
    jac, p = np.asarray(jax.jacfwd(logits_of)(flat)), np.asarray(jax.nn.sigmoid(logits_of(flat)))
    np.testing.assert_allclose(matrix, jac.T @ (jac * (p * (1 - p) / len(p))[:, None]), atol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(lambda w: jnp.mean(models.bce(logits_of(w), y)))(flat), atol=1e-12)
    assert np.linalg.eigvalsh(matrix).min() > -1e-12


def test_unlearn_unit_rows_and_oracle(tiny, study, pop):
    names = ("retrain", "finetune", "newton")
    rows, outcomes = pu.unlearn_unit(tiny, study, pop, method_names=names, seed=0, fid=fidelity.CORRECTED)
    assert set(outcomes) == set(names)
    assert len(rows) == 3 * 2 * (study.unlearn.epochs + 1)
    agree = (outcomes["finetune"].metrics["val_pred"] == outcomes["retrain"].metrics["val_pred"]).mean(axis=-1)
    finetune = [r for r in rows if r["method"] == "finetune"]
    np.testing.assert_allclose([r["oracle_agree"] for r in finetune],
                               [agree[r["run"], r["epoch"]] for r in finetune], atol=1e-6)
    assert agree[:, 0].mean() < 0.95  # epoch 0: the teacher against a fresh model, far apart
    newton = [r["val_acc"] for r in rows if r["method"] == "newton" and r["run"] == 0]
    assert len(set(newton[1:])) == 1  # a one-shot step: flat after epoch 1
    assert pu.unlearn_unit(tiny, study, pop, method_names=names, seed=0, fid=fidelity.CORRECTED)[0] == rows


@pytest.mark.parametrize("method,param,first,second", [("scrub", "fo_w", [0.0, 0.5], [0.2, 0.9]),
                                                       ("salun", "gamma", [0.1, 0.5], [0.3, 0.9]),
                                                       ("eu_k", "k", [1, 2], [2, 1]),
                                                       ("scrub_minmax", "msteps", [1, 2], [3, 4]),
                                                       ("newton", "damping", [0.1, 1.0], [0.01, 10.0]),
                                                       ("finetune", "lr", [0.001, 0.01], [0.003, 0.03])])
def test_a_sweep_over_any_hyperparameter_compiles_once(tiny, study, pop, method, param, first, second, compiles):
    sweep = {"sweep": "hparam", "param": param, "seed": 0, "fid": fidelity.CORRECTED}
    rows = pu.sweep_unit(tiny, study, pop, method, values=first, **sweep)
    before = compiles()
    again = pu.sweep_unit(tiny, study, pop, method, values=second, **sweep)
    assert compiles() == before  # no XLA compilation at all for new values
    assert [(r["value"], r["run"]) for r in rows] == [(first[0], 0), (first[0], 1), (first[1], 0), (first[1], 1)]
    assert {r["value"] for r in again} == set(map(float, second))


@pytest.mark.parametrize("family", [("retrain", "finetune", "eu_k", "cf_k"),
                                    ("scrub", "grad_ascent", "neggrad_plus"),
                                    ("random_labels", "salun", "bad_teacher")], ids=["retain", "forget", "joined"])
def test_methods_that_weight_one_loss_share_its_program(tiny, study, pop, family, compiles):
    run(family[0], pop, study)
    before = compiles()
    for name in family[1:]:
        run(name, pop, study)
    assert compiles() == before  # masks and starts are computed outside the program; they compile no training


def test_each_weighting_of_the_forget_term_loss_is_its_methods_formula(pop):
    """SCRUB, gradient ascent and NegGrad+ as written in their papers, against the shared weighted loss."""
    model, trainer = pop.model, models.Trainer(pop.model)
    params, inputs = models.take_runs((pop.params, pop.inputs), 0)
    batch = {"x": inputs["retain_x"][:8], "y": inputs["retain_y"][:8], "t": inputs["retain_t"][:8]}
    hp = {"kl_w": 0.3, "fo_w": 0.7, "beta": 0.8}

    def ce(x, y):
        return jnp.mean(models.bce(model.logits(params, x), y))

    def kl(t, x):
        p, q = jax.nn.sigmoid(t), jax.nn.sigmoid(model.logits(params, x))
        return jnp.mean(p * jnp.log(p / q) + (1 - p) * jnp.log((1 - p) / (1 - q)))

    retain = ce(batch["x"], batch["y"]) + hp["kl_w"] * kl(batch["t"], batch["x"])
    expected = {"scrub": retain - hp["fo_w"] * kl(inputs["kl_t"], inputs["kl_x"]),
                "grad_ascent": retain - hp["fo_w"] * ce(inputs["trained_x"], inputs["trained_y"]),
                "neggrad_plus": hp["beta"] * ce(batch["x"], batch["y"])
                - (1 - hp["beta"]) * ce(inputs["trained_x"], inputs["trained_y"])}
    for name, value in expected.items():
        method = methods.METHODS[name]
        where = method.forget_inputs
        aux = inputs | {"hp": method.weights(hp), "forget": {"x": inputs[f"{where}_x"], "t": inputs[f"{where}_t"]}}
        got = method.loss(trainer, params, batch, jnp.ones(8), aux)
        np.testing.assert_allclose(got, value, rtol=1e-5, err_msg=name)


def test_the_rate_is_swept_for_every_method_that_trains_and_no_one_shot_step():
    settings = {"methods": list(methods.METHODS), "sweep": {
        "kl_w": [0.0], "fo_w": [0.0], "hparam_points": 2, "lr_factors": [0.5, 2.0]}}
    lines = units.sweep_plan(settings, SimpleNamespace(unlearn=pu.Schedule(1, None, 0.01)))
    rate_swept = {method: values for method, sweep, _, values, _ in lines if sweep == "lr"}
    assert set(rate_swept) == {name for name, m in methods.METHODS.items() if m.step is None}
    assert {"newton", "fisher"}.isdisjoint(rate_swept) and rate_swept["finetune"] == [0.005, 0.02]
