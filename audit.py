"""Was it really forgotten? An audit of every unlearning method beyond accuracies.

For a study, K shadow runs (each its own poison draw, hence its own forget set, over the same clean data) are
trained as teachers, retrained from scratch without their forget set (the *oracle*, independent draws), and
unlearned by every method of the registry, all with the one vmapped engine. Per method and run:

- ``mia_acc``, ``mia_auc``: loss-based membership inference (the NeurIPS 2023 unlearning challenge's
  ``simple_mia``): logistic regression on per-sample losses, forget set (labels as trained) against as many
  held-out validation samples, stratified 10-fold cross-validation. 0.5 = the forget set looks unseen.
- ``ulira_acc``, ``ulira_auc``: U-LiRA (Hayes et al. 2024): per-example Gaussians of the logit-scaled confidence
  of the trained-with label, fitted over the unlearned shadows and over the oracle shadows that had the example in
  their forget set; on held-out target runs a likelihood-ratio test tells "unlearned" from "retrained".
  0.5 = unlearning is indistinguishable from retraining.
- ``kl_oracle_val``, ``kl_oracle_forget``: mean Bernoulli KL(oracle || method) of the output distributions on the
  validation set and on the forget set; ``oracle_agree``: agreement of validation predictions with the oracle.
- ``relearn_epochs``: epochs of training on the poisoned set (retain and forget, the teacher's rate and batch)
  until the forget set's poisoned-label accuracy is back to 95% of the teacher's; ``relearn_capped`` when the cap
  was hit first. Stubborn memories come back fast.
- ``unlearn_s`` (wall seconds per run, compilation excluded) and ``grad_evals`` (sample-gradient evaluations).

A "teacher" row (no unlearning) and the "retrain" method give the two ends of every scale.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import methods
import models
import poison_unlearn as pu

RELEARN_LEVEL = 0.95  # relearned once the forget set's poisoned-label accuracy reaches this share of the teacher's


# ----------------------------------------------------------------------------------------- attacks
def simple_mia(member_losses, nonmember_losses, *, seed, folds=10):
    """Membership inference from per-sample losses: cross-validated (stratified k-fold) logistic regression.

    Returns ``(accuracy, AUC)`` of its out-of-fold decisions; with equal group sizes 0.5 means no leak.
    """
    x = np.concatenate([member_losses, nonmember_losses]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    cv = StratifiedKFold(min(folds, len(member_losses), len(nonmember_losses)), shuffle=True, random_state=seed)
    attack = make_pipeline(StandardScaler(), LogisticRegression())
    scores = cross_val_predict(attack, x, y, cv=cv, method="decision_function")
    return float(np.mean((scores > 0) == y)), float(roc_auc_score(y, scores))


def fit_gaussians(phi, member):
    """Per-example means and one pooled variance of ``phi`` (runs, examples) over the entries where ``member``
    (fixed-variance LiRA: robust with few shadows). Examples never seen get the overall mean."""
    counts = member.sum(axis=0)
    overall = phi[member].mean()
    means = np.where(counts > 0, np.where(member, phi, 0).sum(axis=0) / np.maximum(counts, 1), overall)
    residual = np.where(member, phi - means, 0.0)
    var = max(float((residual**2).sum() / max(member.sum() - np.count_nonzero(counts), 1)), 1e-6)
    return means, var


def ulira(phi_unlearned, phi_retrained, member, *, folds=4):
    """U-LiRA per target run: balanced accuracy and AUC of the likelihood-ratio test "unlearned vs retrained".

    ``phi_*`` (runs, examples): logit-scaled confidence of each example's trained-with label in each run's
    unlearned and retrained model; ``member`` (runs, examples): whether the example was in the run's forget set.
    Runs are split into ``folds``; the Gaussians of each fold's target runs are fitted on the other folds only.
    """
    runs = len(member)
    acc, auc = np.full(runs, np.nan), np.full(runs, np.nan)
    for targets in np.array_split(np.arange(runs), min(folds, runs)):
        fit = np.setdiff1d(np.arange(runs), targets)
        mean_u, var_u = fit_gaussians(phi_unlearned[fit], member[fit])
        mean_r, var_r = fit_gaussians(phi_retrained[fit], member[fit])

        def score(phi, examples):
            return (norm.logpdf(phi, mean_u[examples], np.sqrt(var_u))
                    - norm.logpdf(phi, mean_r[examples], np.sqrt(var_r)))

        for k in targets:
            examples = np.flatnonzero(member[k])
            s_u, s_r = score(phi_unlearned[k, examples], examples), score(phi_retrained[k, examples], examples)
            acc[k] = 0.5 * (np.mean(s_u > 0) + np.mean(s_r <= 0))
            labels = np.r_[np.ones(len(s_u)), np.zeros(len(s_r))]
            auc[k] = roc_auc_score(labels, np.r_[s_u, s_r])
    return acc, auc


# ------------------------------------------------------------------------------------------ pieces
@jax.jit
def _bce(logits, labels):
    return models.bce(logits, labels)


def confidences(model, params, xs, ys):
    """Logits of each run's model on its inputs, and the logit-scaled confidence log(p / (1 - p)) of the
    label ``ys``: (2y - 1) * logit."""
    logits = np.asarray(models.run_logits(model)(params, xs))
    return logits, (2 * np.asarray(ys) - 1) * logits


def bernoulli_kl_np(p_logits, q_logits):
    return np.asarray(models.bernoulli_kl(jnp.asarray(p_logits), jnp.asarray(q_logits)))


def forget_poison_accuracy(model, params, data, aux, shared):
    """The only metric relearning needs, after every epoch: the forget set's accuracy on its poisoned labels."""
    (correct,), _ = models.evaluate_sets(model, params, [aux["trained_x"]], [aux["trained_y"]])
    return {"forget_poison_acc": jnp.mean(correct)}


def relearn_epochs(pop, params, start_level, teacher_level, *, study, recipe, rng_of, cap, chunk=None):
    """Epochs of training on the poisoned set (retain and forget rows as trained, the teacher's batch and rate),
    from ``params`` (whose poisoned-label accuracy is ``start_level``), until the forget set's poisoned-label
    accuracy reaches ``RELEARN_LEVEL`` of ``teacher_level``; returns (epochs, capped) per run."""
    rows = methods.ROWS["joined"](pop, rng_of)
    n_rows = rows["y"].shape[1]
    batch = study.teacher.batch or n_rows
    plan = models.stack_plans([recipe.plan(rng_of(d, "relearn-plan"), n_rows, batch, cap) for d in pop.draws])
    trainer = models.Trainer(pop.model, models.ce_loss, forget_poison_accuracy, batch, recipe)
    out = models.train_runs(trainer, params, rows, plan, study.teacher.lr, aux=pop.inputs, shared=pop.shared,
                            every_epoch=True, chunk=chunk)
    curve = np.concatenate([start_level[:, None], out.metrics["forget_poison_acc"]], axis=1)
    back = curve >= RELEARN_LEVEL * teacher_level[:, None] - 1e-9
    reached = back.any(axis=1)
    return np.where(reached, back.argmax(axis=1), cap), ~reached


# ------------------------------------------------------------------------------------------- a unit
def audit_unit(ds, study, pop, *, method_names, folds, relearn_cap, seed, fid, chunk=None):
    """The audit of every method of a study on ``pop``, its shadow runs (each its own poison draw and teacher).

    ``folds``: U-LiRA's folds of target runs; ``relearn_cap``: most relearning epochs. Returns audit.csv rows
    (method "teacher" first) and the wall seconds of the shadow trainings.
    """
    rng_of = pu.draw_rng(seed)
    recipe = fid.recipe(study.model, "unlearn")
    x = pop.inputs
    model = pop.model
    oracle_pop = dataclasses.replace(pop, draws=[("oracle", *d) for d in pop.draws])
    run = functools.partial(methods.run_method, rng_of=rng_of, schedule=study.unlearn, recipe=recipe,
                            every_epoch=False, chunk=chunk)
    oracle = run("retrain", oracle_pop)
    outcomes = {name: run(name, pop) for name in method_names}

    n_examples = len(ds.ys)
    member = np.zeros((pop.runs, n_examples), bool)
    np.put_along_axis(member, np.asarray(x["forget_idx"]), True, axis=1)
    val_idx = [rng_of(d, "mia-holdout").choice(len(ds.ys_val), member[0].sum(), replace=False) for d in pop.draws]

    def spread(phi):  # (runs, forget) -> (runs, examples), NaN where the example was not forgotten
        out = np.full((pop.runs, n_examples), np.nan)
        np.put_along_axis(out, np.asarray(x["forget_idx"]), phi, axis=1)
        return out

    def describe(params, salt):  # on a device, each (state, run) measures the forget set afresh; runs share val's
        forget_x = models.redraw_runs(models.redraw(x["trained_x"], salt))
        forget_logits, phi = confidences(model, params, forget_x, x["trained_y"])
        val_x = models.redraw(pop.shared["x_val"], salt)
        val_logits = np.asarray(models.run_logits(model, shared_inputs=True)(params, val_x))
        return {"forget": forget_logits, "phi": spread(phi), "val": val_logits,
                "fpa": ((forget_logits > 0) == (np.asarray(x["trained_y"]) > 0)).mean(axis=1)}

    ref = describe(oracle.params, 1)
    teacher = describe(pop.params, 2)
    y_val = np.asarray(ds.ys_val)
    rows = []
    states = [("teacher", teacher, None)] + [(name, describe(o.params, 3 + k), o)
                                             for k, (name, o) in enumerate(outcomes.items())]
    for name, state, outcome in states:
        acc, auc = ulira(np.nan_to_num(state["phi"]), np.nan_to_num(ref["phi"]), member, folds=folds)
        if outcome is None:
            epochs, capped = np.zeros(pop.runs, int), np.zeros(pop.runs, bool)
        else:
            epochs, capped = relearn_epochs(pop, outcome.params, state["fpa"], teacher["fpa"], study=study,
                                            recipe=recipe, rng_of=rng_of, cap=relearn_cap, chunk=chunk)
        for k, draw in enumerate(pop.draws):
            forget_loss = np.asarray(_bce(jnp.asarray(state["forget"][k]), x["trained_y"][k]))
            val_loss = np.asarray(_bce(jnp.asarray(state["val"][k][val_idx[k]]), jnp.asarray(y_val[val_idx[k]])))
            mia_acc, mia_auc = simple_mia(forget_loss, val_loss, seed=models.unit_seed(seed, *draw, "mia") % 2**32)
            rows.append(study.row(ds) | {
                "method": name, "run": k, "mia_acc": pu.as_float(mia_acc), "mia_auc": pu.as_float(mia_auc),
                "ulira_acc": pu.as_float(acc[k]), "ulira_auc": pu.as_float(auc[k]),
                "kl_oracle_val": pu.as_float(bernoulli_kl_np(ref["val"][k], state["val"][k]).mean()),
                "kl_oracle_forget": pu.as_float(bernoulli_kl_np(ref["forget"][k], state["forget"][k]).mean()),
                "oracle_agree": pu.as_float(np.mean((ref["val"][k] > 0) == (state["val"][k] > 0))),
                "relearn_epochs": int(epochs[k]), "relearn_capped": bool(capped[k]),
                "unlearn_s": pu.as_float(outcome.run_s if outcome else 0.0),
                "grad_evals": int(outcome.grad_evals[k] if outcome else 0)})
    return rows, {name: round(o.run_s * pop.runs, 2) for name, o in outcomes.items()}
