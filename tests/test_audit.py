"""The unlearning audit: attacks against known answers, and complete rows for every registered method."""

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm

import audit
import fidelity
import methods
import models
import poison_unlearn as pu
import presets
import run_unlearn_mnist as mnist_script
import units


def test_mia_is_chance_on_samples_the_model_never_saw(mnist):
    """Members and non-members from one distribution: out-of-fold accuracy is binomial around 0.5 with std
    sqrt(0.25 / 300) = 0.029 per attack; the mean of 6 attacks has std 0.012, so 0.05 is a 4-sigma band."""
    model = models.MLP((8,), in_dim=1024)
    params = model.init(models.unit_key(0, "unseen"))
    xs, ys = mnist[2][:900], mnist[3][:900]
    losses = np.asarray(models.bce(model.logits(params, model.prepare(xs)), model.prepare(ys)))
    accs = []
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(len(losses))
        accs.append(audit.simple_mia(losses[order[:150]], losses[order[150:300]], seed=seed)[0])
    assert abs(np.mean(accs) - 0.5) < 0.05


def test_mia_sees_a_memorising_teachers_flipped_samples(mnist):
    """Three teachers that memorise every flipped label (each its own draw): membership inference tells their
    flipped samples from held-out ones, although they are confident on validation too (chance: 0.5 +- 0.027 for
    the mean of three attacks on 60 + 60 samples)."""
    xs, ys, xv, yv = mnist
    ds = pu.Dataset("mnist", "none", xs, ys, xv, yv, raw_dim=784)
    study = pu.Study("mlp", "64-16", "label_flip", 0.3, pu.Schedule(300, 32, 0.01), pu.Schedule(1, None, 0.01))
    pop = pu.train_teachers(ds, study, runs=3, seed=0, fid=fidelity.CORRECTED, shared_teacher=False)
    attacks, held_x, held_y = [], pop.shared["x_val"][:60], pop.shared["y_val"][:60]
    for run in range(3):
        forget, params = models.take_runs(pop.inputs, run), models.take_runs(pop.params, run)
        logits = pop.model.logits(params, forget["trained_x"])
        assert np.mean((logits > 0) == (forget["trained_y"] > 0)) >= 0.95  # it memorised the flips
        member = np.asarray(models.bce(logits, forget["trained_y"]))
        held = np.asarray(models.bce(pop.model.logits(params, held_x), held_y))
        attacks.append(audit.simple_mia(member, held, seed=run))
    acc, auc = np.mean(attacks, axis=0)
    assert acc > 0.62 and auc > 0.62


def synthetic_confidences(rng, shift, runs=240, examples=60, rate=0.3):
    means = rng.normal(size=examples)
    member = rng.random((runs, examples)) < rate
    unlearned = means + rng.normal(size=(runs, examples))
    retrained = means + shift + rng.normal(size=(runs, examples))
    return unlearned, retrained, member


def test_ulira_recovers_the_bayes_optimal_accuracy(rng):
    """Unit-variance Gaussians per example, means shifted by 1: the best test has accuracy Phi(1/2) = 0.691."""
    acc, auc = audit.ulira(*synthetic_confidences(rng, 1.0), folds=4)
    assert np.mean(acc) == pytest.approx(norm.cdf(0.5), abs=0.02)
    assert np.mean(auc) == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.03)  # AUC of two unit Gaussians 1 apart


def test_ulira_is_chance_when_unlearning_is_retraining(rng):
    acc, auc = audit.ulira(*synthetic_confidences(rng, 0.0), folds=4)
    assert np.mean(acc) == pytest.approx(0.5, abs=0.03) and np.mean(auc) == pytest.approx(0.5, abs=0.03)


def smoke_mlp_study(method_names, **changes):
    """The smoke preset's MNIST MLP unlearning study with only ``method_names``, and its context."""
    settings = presets.merged(mnist_script.SMOKE, {"methods": method_names, **changes})
    settings |= {"seed": 0, "dtype": "complex64", "dataset": "mnist", "fidelity": fidelity.CORRECTED.as_dict()}
    ctx = units.Context(settings, mnist_script.load)
    return ctx, next(s for s in ctx.studies() if s.model == "mlp")


def test_audit_rows_cover_every_registered_method_including_a_new_one(monkeypatch):
    """A method added to the registry is audited with no audit code change."""
    monkeypatch.setitem(methods.METHODS, "finetune_gently",
                        methods.Method(methods.retain_loss, hparams={"kl_w": 0.5}))
    ctx, study = smoke_mlp_study(["retrain", "finetune_gently", "newton"], audit={"shadows": 6, "folds": 3})
    rows = units._audit(ctx, study=study).rows
    assert [r["method"] for r in rows[::6]] == ["teacher", "retrain", "finetune_gently", "newton"]
    columns = units.PARTS["audit"].columns
    assert all(set(columns) <= set(r) for r in rows)
    retrain = [r for r in rows if r["method"] == "retrain"]
    assert all(r["kl_oracle_val"] > 0 for r in retrain)  # retrained again from other draws: not the oracle itself
    teacher = [r for r in rows if r["method"] == "teacher"]
    assert all(r["relearn_epochs"] == 0 and r["grad_evals"] == 0 for r in teacher)
    assert all(r["grad_evals"] > 0 and r["unlearn_s"] >= 0 for r in rows if r["method"] != "teacher")


@pytest.mark.parametrize("width", ["runs", "all"])
def test_the_audit_and_the_sweep_reuse_the_unlearn_parts_compiled_programs(width):
    """With ``runs_per_program="runs"`` (quick and smoke) every population runs --runs runs at a time and every
    epoch's metrics are a traced choice, so after the unlearn part the audit (5 shadows: a padded last chunk)
    compiles only relearning, and the sweep nothing. With ``"all"`` (paper) each population is one program."""
    ctx, study = smoke_mlp_study(["finetune", "retrain"], audit={"shadows": 5, "folds": 3}, runs_per_program=width)
    assert ctx.chunk == {"runs": ctx.settings["runs"], "all": None}[width]
    units._unlearn(ctx, study=study)
    before = models.TRACE_COUNT["fit"]
    units._audit(ctx, study=study)
    after_audit = models.TRACE_COUNT["fit"]
    if width == "all":  # 5 shadows: the methods' programs compiled anew (and relearning's)
        assert after_audit >= before + 2
        return
    assert after_audit <= before + 1  # relearning's program, unless an earlier test compiled it
    lines = units.sweep_plan(ctx.settings, study)
    for method, sweep, param, values, fixed in lines:
        units._sweep(ctx, study=study, method=method, sweep=sweep, param=param, values=values, fixed=fixed)
    assert {line[0] for line in lines} == {"finetune", "retrain"} and models.TRACE_COUNT["fit"] == after_audit


def test_relearning_counts_epochs_until_training_on_the_poison_restores_the_teachers_memory():
    """From a retrained model (flips forgotten) relearning takes epochs, from the teacher none; and the count is
    where the curve of plain training on the poisoned set (every metric evaluated) first reaches 95% of the
    teacher's poisoned-label accuracy."""
    ctx, study = smoke_mlp_study(["retrain"], unlearn={"studies": {"mlp": {"teacher": presets.schedule(30, 10, 0.03)}}})
    pop = ctx.population(study, runs=4, shared_teacher=False)
    recipe, rng_of, cap = ctx.fid.recipe("mlp", "unlearn"), pu.draw_rng(0), 20
    level = methods.evaluate(pop, pop.params)[0]["forget_poison_acc"]
    retrained = methods.run_method("retrain", pop, rng_of, schedule=study.unlearn, recipe=recipe).params
    start = methods.evaluate(pop, retrained)[0]["forget_poison_acc"]

    def relearn(params, start_level):
        return audit.relearn_epochs(pop, params, start_level, level, study=study, recipe=recipe, rng_of=rng_of,
                                    cap=cap)

    epochs, capped = relearn(retrained, start)
    def relearn_draws(draw, purpose):  # relearning's own minibatch stream, asked for as a method's "plan"
        return rng_of(draw, "relearn-plan" if purpose == "plan" else purpose)

    poisoned_training = methods.run_method(methods.Method(models.ce_loss, rows="joined"),
                                           dataclasses.replace(pop, params=retrained), relearn_draws,
                                           schedule=pu.Schedule(cap, study.teacher.batch, study.teacher.lr),
                                           recipe=recipe)
    back = poisoned_training.metrics["forget_poison_acc"] >= audit.RELEARN_LEVEL * level[:, None] - 1e-9
    np.testing.assert_array_equal(epochs, np.where(back.any(axis=1), back.argmax(axis=1), cap))
    np.testing.assert_array_equal(capped, ~back.any(axis=1))
    assert np.all(start < audit.RELEARN_LEVEL * level) and np.all(epochs > 0)
    np.testing.assert_array_equal(relearn(pop.params, level)[0], 0)
