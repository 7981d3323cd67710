"""The experiments: resilience sweeps over the poisoning ratio, unlearning studies and their sweeps.

Every function takes either model (``models.QNN`` or ``models.MLP``); the unlearning methods are the registry of
``methods.py``. A *unit* is a fixed set of trainings that runs as one vmapped computation and yields rows of a
results table. Every random draw derives from (seed, the draw's identity), so recomputing a unit gives the same
rows; which definitions a unit uses (the paper's or ours) comes from a ``fidelity.Fidelity``.
"""

import math
from dataclasses import dataclass, replace

import jax.numpy as jnp
import numpy as np

import datar
import methods
import models


@dataclass
class Dataset:
    """A clean dataset: training and validation inputs (NumPy), 0/1 labels, and the unpadded input length."""

    name: str
    gauge: str
    xs: np.ndarray
    ys: np.ndarray
    xs_val: np.ndarray
    ys_val: np.ndarray
    raw_dim: int


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train: epochs, minibatch size (None = the whole set), learning rate."""

    epochs: int
    batch: int | None
    lr: float


OBSERVABLES = {"diagonal": models.DiagonalObservable, "unitary": models.UnitaryObservable}
QNN_VARIANTS = {"": {}, "cnot": {"ansatz": "cnot"}, "noent": {"ansatz": "noent"}, "scale20": {"readout": 20.0}}


def build_model(kind, arch, dim, complex_inputs=False, *, mlp_precision=None, qnn_precision=None, device=None):
    """A model for inputs of length ``dim``: ``("qnn", "depth6")`` -> QNN on log2(dim) qubits (``"depth5-cnot"``:
    the CNOT-ring ansatz; ``"depth6-noent"``: no rzz ring; ``"depth6-scale20"``: readout sigmoid(20 <Z>));
    ``("mlp", "64-16")`` -> MLP on real features, in ``mlp_precision`` (default: the process's);
    ``("observable", "diagonal" | "unitary")`` -> a trained bounded observable (``models.DiagonalObservable``,
    ``models.UnitaryObservable``). A QNN's parameters are in ``qnn_precision`` (default: the process's), and it is
    measured on ``device`` (a ``models.Device``; None or an exact one: the exact statevector)."""
    if kind == "qnn":
        depth, _, variant = arch.removeprefix("depth").partition("-")
        if variant not in QNN_VARIANTS:
            raise ValueError(f"unknown QNN variant {variant!r}; choose from {', '.join(QNN_VARIANTS)}")
        qnn = models.QNN(int(math.log2(dim)), int(depth), **QNN_VARIANTS[variant], precision=qnn_precision)
        return qnn if device is None or device.exact else models.DeviceQNN(qnn, device)
    if kind == "mlp":
        return models.MLP(tuple(int(h) for h in arch.split("-")), in_dim=2 * dim if complex_inputs else dim,
                          precision=mlp_precision)
    if kind == "observable":
        return OBSERVABLES[arch](dim, complex_inputs)
    raise ValueError(f"unknown model {kind!r}; choose 'qnn', 'mlp' or 'observable'")


def model_for(ds, kind, arch, fid):
    """The model of a resilience unit or an unlearning study; the MLP's and the QNN's parameter precision follow
    fidelity items j and l, the QNN is measured on the run's device."""
    return build_model(kind, arch, ds.xs.shape[1], np.iscomplexobj(ds.xs), mlp_precision=fid.mlp_dtype,
                       qnn_precision=fid.qnn_dtype, device=fid.device)


def poisoned_copy(ds, poison, alpha, *, seed, run, law="haar"):
    """The poisoned training set of one run, ``(xs, ys, idx)``: the same for both models and gauges."""
    rng = models.unit_rng(seed, "poison", ds.name, poison, alpha, run)
    return datar.poison(ds.xs, ds.ys, poison, alpha, rng, law=law, dim=ds.raw_dim)


def row_mask(n, rows):
    """A 0/1 float mask over ``n`` training rows, 1 on ``rows`` (poisoned, held-out or real rows)."""
    return np.isin(np.arange(n), rows).astype(np.float32)


def shared_validation(model, ds):
    return {"x_val": model.prepare(ds.xs_val), "y_val": jnp.asarray(ds.ys_val)}


def as_float(value):
    return round(float(value), 6)


def train_cells(model, sets, schedule, *, recipe, seed, draws, shared, aux=None, metrics=models.fit_metrics,
                loss=models.ce_loss, record=None, stop=None, chunk=None):
    """Train one model on several training sets ("cells", one run each) as one computation.

    The resilience sweeps, the teachers and the Hessian study all train this way. ``sets``: ``(xs, ys)`` per
    cell; ``draws``: each cell's identity, from which its initialisation and minibatch order derive; ``stop``:
    per cell, the epochs it trains (the rest of the schedule's steps are empty; epoch-ordered plans only).
    """
    data = {"x": model.prepare(np.stack([s[0] for s in sets])), "y": jnp.asarray(np.stack([s[1] for s in sets]))}
    n = data["y"].shape[1]
    batch = schedule.batch or n
    params0 = models.init_runs(model, [models.unit_key(seed, "init", *d) for d in draws])
    plans = [recipe.plan(models.unit_rng(seed, "order", *d), n, batch, schedule.epochs) for d in draws]
    plan = models.stack_plans([models.stop_after(p, e) for p, e in zip(plans, stop)] if stop else plans)
    trainer = models.Trainer(model, loss=loss, metrics=metrics, batch_size=batch, recipe=recipe)
    return models.train_runs(trainer, params0, data, plan, schedule.lr, aux=aux, shared=shared, record=record,
                             chunk=chunk)


# ---------------------------------------------------------------------------------- resilience
def resilience_unit(ds, kind, arch, poison, alphas, *, runs, schedule, seed, fid, chunk=None):
    """Train one model on every (alpha, run) of a poison at once; return phase.csv rows.

    Rows: train accuracy on the poisoned set as trained, validation accuracy on the clean set, and ``flip_fit``:
    accuracy on the poisoned rows with their poisoned labels (how much of the poison the model fitted; NaN at 0).
    """
    model = model_for(ds, kind, arch, fid)
    cells = [(alpha, run) for alpha in alphas for run in range(runs)]
    copies = [poisoned_copy(ds, poison, alpha, seed=seed, run=run, law=fid.feature_noise) for alpha, run in cells]
    poisoned = np.stack([row_mask(len(ds.ys), idx) for _, _, idx in copies])
    draws = [("phase", ds.name, ds.gauge, kind, arch, poison, alpha, run) for alpha, run in cells]
    out = train_cells(model, [c[:2] for c in copies], schedule, recipe=fid.recipe(kind, "train"), seed=seed,
                      draws=draws, shared=shared_validation(model, ds), aux={"poisoned": poisoned}, chunk=chunk)
    return [{"dataset": ds.name, "gauge": ds.gauge, "model": kind, "arch": arch, "poison": poison,
             "alpha": alpha, "run": run, "train_acc": as_float(out.metrics["train_acc"][i]),
             "val_acc": as_float(out.metrics["val_acc"][i]),
             "flip_fit": as_float(out.metrics["flip_fit"][i]) if alpha > 0 else float("nan")}
            for i, (alpha, run) in enumerate(cells)]


# ---------------------------------------------------------------------------------- unlearning
@dataclass(frozen=True)
class Study:
    """One unlearning study: a teacher trained on poisoned data, then unlearned."""

    model: str
    arch: str
    poison: str
    alpha: float
    teacher: Schedule
    unlearn: Schedule
    recipe: str = "plain"  # how the teacher trains: "plain", or "tuned" (the MLP's defence picked by cross-validation)

    @property
    def identity(self):
        """What the study's random draws derive from (a plain study's, as before recipes existed)."""
        return (self.model, self.arch, self.poison, self.alpha) + (() if self.recipe == "plain" else (self.recipe,))

    def row(self, ds):
        return {"dataset": ds.name, "model": self.model, "arch": self.arch, "recipe": self.recipe,
                "poison": self.poison, "alpha": self.alpha}


SCRUB_FORGET_INPUTS = {"clean": "forget_x", "poisoned": "forget_x_poisoned"}  # fidelity item d


def unlearning_inputs(model, ds, copies, teachers, fid):
    """Per-run arrays the methods read (see ``methods.Population``), from poisoned copies and their teachers."""
    splits = [datar.retain_forget_split(ds.xs, ds.ys, *copy) for copy in copies]

    def stack(key):
        return np.stack([split[key] for split in splits])

    logits = models.run_logits(model)
    inputs = {"retain_x": model.prepare(stack("retain_x")), "retain_y": jnp.asarray(stack("retain_y")),
              "forget_x": model.prepare(stack("forget_x")), "forget_y": jnp.asarray(stack("forget_y")),
              "trained_x": model.prepare(stack("forget_x_poisoned")),
              "trained_y": jnp.asarray(stack("forget_y_poisoned")),
              "kl_x": model.prepare(stack(SCRUB_FORGET_INPUTS[fid.scrub_forget_inputs])),
              "forget_idx": jnp.asarray(np.stack([copy[2] for copy in copies]))}
    for name in ("retain", "trained", "kl"):
        inputs[f"{name}_t"] = logits(teachers, inputs[f"{name}_x"])
    return inputs


def teacher_count(runs, shared_teacher):
    return 1 if shared_teacher else runs


def train_teachers(ds, study, *, runs, seed, fid, shared_teacher, defences=None, chunk=None):
    """The poisoned teachers of R runs and each run's retain and forget arrays, as a ``methods.Population``.

    ``shared_teacher``: one teacher, on run 0's poison draw, for every run (the authors' studies: runs then differ
    only in their unlearning draws); otherwise each run has its own poison draw and teacher. ``defences``: per
    teacher, the MLP's ``(defence, strength)`` to train with (``models.defended_loss``; early stopping stops after
    ``strength`` epochs), or None for the plain recipe.
    """
    model = model_for(ds, study.model, study.arch, fid)
    count = teacher_count(runs, shared_teacher)
    copies = [poisoned_copy(ds, study.poison, study.alpha, seed=seed, run=r, law=fid.feature_noise)
              for r in range(count)]
    draws = [("teacher", ds.name, ds.gauge, *study.identity, r) for r in range(count)]
    shared = shared_validation(model, ds)
    recipe, extra = fid.recipe(study.model, "train"), {}
    if defences is not None:
        recipe = replace(recipe, weight_decay=True)
        extra = {"loss": models.defended_loss, "aux": models.stack_plans([models.defence_aux(*d) for d in defences]),
                 "stop": [int(s) if name == "early_stop" else study.teacher.epochs for name, s in defences]}
    out = train_cells(model, [c[:2] for c in copies], study.teacher, recipe=recipe, seed=seed, draws=draws,
                      shared=shared, chunk=chunk, **extra)
    pick = np.zeros(runs, int) if shared_teacher else np.arange(runs)
    inputs = unlearning_inputs(model, ds, copies, out.params, fid)
    return methods.Population(model, models.take_runs(out.params, pick), models.take_runs(inputs, pick), shared,
                              [("unlearn", ds.name, ds.gauge, *study.identity, r) for r in range(runs)])


def draw_rng(seed):
    """``rng_of(draw, purpose)``: the NumPy generator of one random draw of a run, from ``seed``."""
    return lambda draw, purpose: models.unit_rng(seed, *draw, purpose)


def unlearn_unit(ds, study, pop, *, method_names, seed, fid, chunk=None):
    """Every method on a population; returns unlearn.csv rows and the outcome of each method.

    ``oracle_agree`` is the fraction of validation predictions equal to those of the retrained model of the same
    run at the same epoch (needs retrain among the methods).
    """
    recipe = fid.recipe(study.model, "unlearn")
    outcomes = {name: methods.run_method(name, pop, draw_rng(seed), schedule=study.unlearn, recipe=recipe,
                                         chunk=chunk) for name in method_names}
    oracle = outcomes.get("retrain")
    rows = []
    for name, outcome in outcomes.items():
        metrics = outcome.metrics
        agree = (metrics["val_pred"] == oracle.metrics["val_pred"]).mean(axis=-1) if oracle else None
        for run in range(pop.runs):
            for epoch in range(study.unlearn.epochs + 1):
                rows.append(study.row(ds) | {"method": name, "run": run, "epoch": epoch,
                                             **{m: as_float(metrics[m][run, epoch]) for m in methods.UNLEARN_METRICS},
                                             "oracle_agree": as_float(agree[run, epoch]) if oracle else float("nan")})
    return rows, outcomes


def sweep_unit(ds, study, pop, method, *, sweep, param, values, seed, fid, fixed=None, chunk=None):
    """Final metrics of ``method`` over ``values`` of one hyper-parameter (or ``param="lr"``, the learning
    rate), R runs each, as one computation (the values are traced: one compilation). ``fixed`` sets others."""
    cells = [(value, run) for value in values for run in range(pop.runs)]
    column = np.array([value for value, _ in cells], dtype=float)
    hp = dict(fixed or {}) | ({} if param == "lr" else {param: column})
    lrs = column if param == "lr" else np.full(len(cells), study.unlearn.lr)
    outcome = methods.run_method(method, pop.take(np.array([run for _, run in cells])), draw_rng(seed),
                                 schedule=study.unlearn, recipe=fid.recipe(study.model, "unlearn"), hp=hp, lr=lrs,
                                 every_epoch=False, chunk=chunk)
    table = methods.hyperparameters(method, len(cells), **hp)
    return [study.row(ds) | {"method": method, "sweep": sweep, "param": param, "value": value,
                             **{w: as_float(table[w][i]) if w in table else float("nan") for w in ("kl_w", "fo_w")},
                             "lr": as_float(lrs[i]), "run": run,
                             **{m: as_float(outcome.metrics[m][i]) for m in ("val_acc", "forget_acc",
                                                                                "forget_poison_acc")}}
            for i, (value, run) in enumerate(cells)]
