"""The experiments: resilience sweeps over the poisoning ratio, four unlearning methods, weight sweeps.

Every function takes either model (``models.QNN`` or ``models.MLP``): the methods are loss
compositions over the one engine of ``models.py``. A *unit* is a fixed set of trainings that runs as
one vmapped computation and yields rows of a results table; every random draw of a unit derives from
(seed, unit identity, run), so recomputing a unit gives the same rows.
"""

import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import datar
import models

METHODS = ("retrain", "finetune", "scrub", "grad_ascent")
PAPER_WEIGHTS = {"retrain": (0.0, 0.0), "finetune": (0.0, 0.0), "scrub": (0.0, 0.2), "grad_ascent": (0.0, 0.2)}
"""(kl_w, fo_w) of each method: the paper's defaults."""


@dataclass
class Dataset:
    """A clean dataset: training and validation inputs (NumPy) and 0/1 labels."""

    name: str
    gauge: str
    xs: np.ndarray
    ys: np.ndarray
    xs_val: np.ndarray
    ys_val: np.ndarray


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train: epochs, minibatch size (None = the whole set), learning rate."""

    epochs: int
    batch: int | None
    lr: float


def build_model(kind, arch, dim, complex_inputs=False):
    """A model for inputs of length ``dim``: ``("qnn", "depth6")`` -> QNN on log2(dim) qubits
    (``"depth5-cnot"``: the CNOT-ring ansatz); ``("mlp", "64-16")`` -> MLP on real features."""
    if kind == "qnn":
        depth, _, ansatz = arch.removeprefix("depth").partition("-")
        return models.QNN(int(math.log2(dim)), int(depth), ansatz or "rzz")
    if kind == "mlp":
        return models.MLP(tuple(int(h) for h in arch.split("-")), in_dim=2 * dim if complex_inputs else dim)
    raise ValueError(f"unknown model {kind!r}; choose 'qnn' or 'mlp'")


def model_for(ds, kind, arch):
    return build_model(kind, arch, ds.xs.shape[1], np.iscomplexobj(ds.xs))


def prng_key(seed, *identity):
    return jax.random.PRNGKey(models.unit_seed(seed, *identity))


def poisoned_copy(ds, poison, alpha, seed, run):
    """The poisoned training set of one run: ``(xs, ys, idx)``, the same for both models and gauges."""
    rng = np.random.default_rng(models.unit_seed(seed, "poison", ds.name, poison, alpha, run))
    return datar.poison(ds.xs, ds.ys, poison, alpha, rng)


def shared_validation(model, ds):
    return {"x_val": model.prepare(ds.xs_val), "y_val": jnp.asarray(ds.ys_val)}


def stacked(items, key):
    """The arrays ``item[key]`` of a list of per-run records, stacked along a new leading run axis."""
    return np.stack([item[key] for item in items])


def as_float(value):
    return round(float(value), 6)


# ---------------------------------------------------------------------------------- resilience
def resilience_unit(ds, kind, arch, poison, alphas, runs, schedule, seed):
    """Train one model on every (alpha, run) of a poison at once; return phase.csv rows.

    Rows: train accuracy on the poisoned set as trained, validation accuracy on the clean set.
    """
    model = model_for(ds, kind, arch)
    cells = [(alpha, run) for alpha in alphas for run in range(runs)]
    sets = [poisoned_copy(ds, poison, alpha, seed, run) for alpha, run in cells]
    data = {"x": model.prepare(np.stack([s[0] for s in sets])), "y": jnp.asarray(np.stack([s[1] for s in sets]))}
    ident = (ds.name, ds.gauge, kind, arch, poison)
    params0 = models.init_runs(model, jnp.stack([prng_key(seed, "init", *ident, a, r) for a, r in cells]))
    keys = jnp.stack([prng_key(seed, "shuffle", *ident, a, r) for a, r in cells])
    trainer = models.Trainer(model, epochs=schedule.epochs, batch_size=schedule.batch or len(ds.ys))
    _, metrics = models.train_runs(trainer, params0, data, keys, schedule.lr, shared=shared_validation(model, ds))
    return [{"dataset": ds.name, "gauge": ds.gauge, "model": kind, "arch": arch, "poison": poison,
             "alpha": alpha, "run": run, "train_acc": as_float(metrics["train_acc"][i]),
             "val_acc": as_float(metrics["val_acc"][i])} for i, (alpha, run) in enumerate(cells)]


# ---------------------------------------------------------------------------------- unlearning
def bernoulli_kl(teacher_logits, student_logits):
    """KL(teacher || student) of two Bernoulli distributions given by their logits."""
    p = jax.nn.sigmoid(teacher_logits)
    log_p, log_q = jax.nn.log_sigmoid(teacher_logits), jax.nn.log_sigmoid(student_logits)
    log_p1, log_q1 = jax.nn.log_sigmoid(-teacher_logits), jax.nn.log_sigmoid(-student_logits)
    return p * (log_p - log_q) + (1 - p) * (log_p1 - log_q1)


def retain_loss(model, params, batch, mask, aux):
    """CE(retain) + kl_w KL(teacher || student)(retain): retrain and finetune use kl_w = 0."""
    logits = model.logits(params, batch["x"])
    kl = models.masked_mean(bernoulli_kl(batch["t"], logits), mask)
    return models.bce(logits, batch["y"], mask) + aux["kl_w"] * kl


def scrub_loss(model, params, batch, mask, aux):
    """SCRUB: retain terms - fo_w KL(teacher || student) on the whole forget set."""
    forget = model.logits(params, aux["forget_x_poisoned"])
    return retain_loss(model, params, batch, mask, aux) - aux["fo_w"] * jnp.mean(bernoulli_kl(aux["forget_t"], forget))


def grad_ascent_loss(model, params, batch, mask, aux):
    """Gradient ascent: retain terms - fo_w CE on the whole forget set with its poisoned labels."""
    forget = model.logits(params, aux["forget_x_poisoned"])
    return retain_loss(model, params, batch, mask, aux) - aux["fo_w"] * models.bce(forget, aux["forget_y_poisoned"])


LOSSES = {"retrain": retain_loss, "finetune": retain_loss, "scrub": scrub_loss, "grad_ascent": grad_ascent_loss}


def unlearn_metrics(model, params, data, aux, shared):
    """Accuracies on the poisoned training set, validation, retain and forget (clean and poisoned)."""
    acc = {"retain_acc": models.accuracy(model, params, data["x"], data["y"]),
           "forget_acc": models.accuracy(model, params, aux["forget_x"], aux["forget_y"]),
           "forget_poison_acc": models.accuracy(model, params, aux["forget_x_poisoned"], aux["forget_y_poisoned"])}
    n_retain, n_forget = data["y"].shape[0], aux["forget_y"].shape[0]
    acc["train_acc"] = (n_retain * acc["retain_acc"] + n_forget * acc["forget_poison_acc"]) / (n_retain + n_forget)
    val_logits = model.logits(params, shared["x_val"])
    acc["val_acc"] = jnp.mean((val_logits > 0) == (shared["y_val"] > 0))
    acc["val_pred"] = val_logits > 0
    return acc


@dataclass(frozen=True)
class Study:
    """One unlearning study: a teacher trained on poisoned data, then unlearned."""

    model: str
    arch: str
    poison: str
    alpha: float
    teacher: Schedule
    unlearn: Schedule

    @property
    def identity(self):
        return (self.model, self.arch, self.poison, self.alpha)


def train_teachers(ds, study, runs, seed):
    """The poisoned teachers of a study (R runs) and each run's retain/forget split."""
    model = model_for(ds, study.model, study.arch)
    splits = []
    for run in range(runs):
        xs_p, ys_p, idx = poisoned_copy(ds, study.poison, study.alpha, seed, run)
        splits.append(datar.retain_forget_split(ds.xs, ds.ys, xs_p, ys_p, idx) | {"xs": xs_p, "ys": ys_p})
    data = {"x": model.prepare(stacked(splits, "xs")), "y": jnp.asarray(stacked(splits, "ys"))}
    ident = (ds.name, ds.gauge, *study.identity)
    params0 = models.init_runs(model, jnp.stack([prng_key(seed, "teacher-init", *ident, r) for r in range(runs)]))
    keys = jnp.stack([prng_key(seed, "teacher-shuffle", *ident, r) for r in range(runs)])
    trainer = models.Trainer(model, epochs=study.teacher.epochs, batch_size=study.teacher.batch or len(ds.ys))
    params, _ = models.train_runs(trainer, params0, data, keys, study.teacher.lr, shared=shared_validation(model, ds))
    return model, params, unlearning_inputs(model, params, splits)


def unlearning_inputs(model, teacher, splits):
    """Per-run arrays of the unlearning losses: retain set (minibatched, with the teacher's logits)
    and the whole forget set (clean and poisoned, with the teacher's logits on what it trained on)."""
    stack = {k: stacked(splits, k) for k in splits[0] if k not in ("xs", "ys")}
    retain_x, forget_xp = model.prepare(stack["retain_x"]), model.prepare(stack["forget_x_poisoned"])
    logits = jax.jit(jax.vmap(model.logits))
    data = {"x": retain_x, "y": jnp.asarray(stack["retain_y"]), "t": logits(teacher, retain_x)}
    aux = {"forget_x": model.prepare(stack["forget_x"]), "forget_y": jnp.asarray(stack["forget_y"]),
           "forget_x_poisoned": forget_xp, "forget_y_poisoned": jnp.asarray(stack["forget_y_poisoned"]),
           "forget_t": logits(teacher, forget_xp)}
    return data, aux


def unlearn_runs(model, method, teacher, inputs, shared, keys, schedule, kl_w, fo_w, every_epoch=True):
    """Run ``method`` for R runs (one per key) from the teachers; weights are traced (R,) values.

    retrain starts from a fresh initialisation, the other methods from the teacher. Returns the
    metrics (with an epoch axis when ``every_epoch``; epoch 0 = before unlearning).
    """
    data, aux = inputs
    num = len(keys)
    weights = {"kl_w": jnp.broadcast_to(jnp.asarray(kl_w, models.real_dtype()), (num,)),
               "fo_w": jnp.broadcast_to(jnp.asarray(fo_w, models.real_dtype()), (num,))}
    start = teacher
    if method == "retrain":
        start = models.init_runs(model, jax.vmap(jax.random.fold_in, (0, None))(keys, 1))
    trainer = models.Trainer(model, LOSSES[method], unlearn_metrics, schedule.epochs,
                             schedule.batch or data["y"].shape[1], every_epoch)
    _, metrics = models.train_runs(trainer, start, data, keys, schedule.lr, aux | weights, shared)
    return metrics


def unlearn_unit(ds, study, runs, seed, methods=METHODS, weights=PAPER_WEIGHTS, teacher=None):
    """Teacher + every method for R runs; returns unlearn.csv rows and the wall time of each method.

    ``oracle_agree`` is the fraction of validation predictions equal to those of the retrained model
    of the same run at the same epoch (needs retrain among the methods).
    """
    model, params, inputs = teacher or train_teachers(ds, study, runs, seed)
    shared = shared_validation(model, ds)
    keys = jnp.stack([prng_key(seed, "unlearn", ds.name, ds.gauge, *study.identity, r) for r in range(runs)])
    trajectories, wall = {}, {}
    for method in methods:
        start = time.perf_counter()
        trajectories[method] = unlearn_runs(model, method, params, inputs, shared, keys, study.unlearn,
                                            *weights[method])
        wall[method] = round(time.perf_counter() - start, 2)
    oracle = trajectories.get("retrain")
    rows = []
    for method, metrics in trajectories.items():
        agree = (metrics["val_pred"] == oracle["val_pred"]).mean(axis=-1) if oracle is not None else None
        for run in range(runs):
            for epoch in range(study.unlearn.epochs + 1):
                rows.append({"dataset": ds.name, "model": study.model, "arch": study.arch, "poison": study.poison,
                             "alpha": study.alpha, "method": method, "run": run, "epoch": epoch,
                             **{m: as_float(metrics[m][run, epoch]) for m in UNLEARN_METRICS},
                             "oracle_agree": as_float(agree[run, epoch]) if agree is not None else float("nan")})
    return rows, wall


UNLEARN_METRICS = ("train_acc", "val_acc", "retain_acc", "forget_acc", "forget_poison_acc")


def sweep_unit(ds, study, method, kl_w, fo_ws, runs, seed, teacher=None):
    """Final metrics of ``method`` over a line of forget weights (and one kl_w), R runs each, at once."""
    model, params, (data, aux) = teacher or train_teachers(ds, study, runs, seed)
    cells = [(fo_w, run) for fo_w in fo_ws for run in range(runs)]
    pick = np.array([run for _, run in cells])
    keys = jnp.stack([prng_key(seed, "unlearn", ds.name, ds.gauge, *study.identity, r) for _, r in cells])
    tiled = models.take_runs((params, data, aux), pick)
    metrics = unlearn_runs(model, method, tiled[0], tiled[1:], shared_validation(model, ds), keys,
                           study.unlearn, kl_w, jnp.array([f for f, _ in cells]), every_epoch=False)
    return [{"dataset": ds.name, "model": study.model, "method": method, "kl_w": kl_w, "fo_w": fo_w, "run": run,
             **{m: as_float(metrics[m][i]) for m in ("val_acc", "forget_acc", "forget_poison_acc")}}
            for i, (fo_w, run) in enumerate(cells)]


# ------------------------------------------------------------------------- studies from settings
class Context:
    """What the units of one run script share: settings, datasets and teachers (made once each)."""

    def __init__(self, settings, load, out):
        self.settings, self.load, self.out = settings, load, out
        self.seed, self.runs = settings["seed"], settings["runs"]
        self._data, self._teachers = {}, {}
        self.timings = {}  # wall seconds of each unlearning method, recorded in config.json

    def data(self, gauge):
        if gauge not in self._data:
            self._data[gauge] = self.load(self.settings, gauge)
        return self._data[gauge]

    def teacher(self, study):
        if study not in self._teachers:
            self._teachers[study] = train_teachers(self.data(self.settings["gauge"]), study, self.runs, self.seed)
        return self._teachers[study]


def studies(settings):
    return [Study(s["model"], s["arch"], s["poison"], s["alpha"], Schedule(*s["teacher"]), Schedule(*s["unlearn"]))
            for s in settings["unlearn"]["studies"]]


def mean_by(rows, column, metric):
    values = {}
    for row in rows:
        values.setdefault(row[column], []).append(row[metric])
    return " ".join(f"{k}:{np.mean(v):.2f}" for k, v in values.items())


def _phase(ctx, gauge, spec, poison):
    rows = resilience_unit(ctx.data(gauge), spec["model"], spec["arch"], poison, ctx.settings["phase"]["alphas"],
                           ctx.runs, Schedule(*spec["schedule"]), ctx.seed)
    return rows, "val_acc by alpha " + mean_by(rows, "alpha", "val_acc")


def phase_units(ctx):
    """One unit per (model, architecture, gauge, poison): every alpha and run trained at once."""
    units = []
    for spec in ctx.settings["phase"]["models"]:
        gauge = spec.get("gauge", ctx.settings["gauge"])
        for poison in spec.get("poisons", ctx.settings["phase"]["poisons"]):
            key = {"dataset": ctx.settings["dataset"], "gauge": gauge, "model": spec["model"], "arch": spec["arch"],
                   "poison": poison}
            units.append((key, f"{spec['model']} {spec['arch']} {gauge} {poison}",
                          functools.partial(_phase, ctx, gauge, spec, poison)))
    return units


def _unlearn(ctx, study):
    ds = ctx.data(ctx.settings["gauge"])
    rows, wall = unlearn_unit(ds, study, ctx.runs, ctx.seed, teacher=ctx.teacher(study))
    ctx.timings.update({f"{study.model} {study.arch} {study.poison} {m}": w for m, w in wall.items()})
    final = [r for r in rows if r["epoch"] == study.unlearn.epochs]
    return rows, ("final val_acc " + mean_by(final, "method", "val_acc") + "; forget_poison_acc "
                  + mean_by(final, "method", "forget_poison_acc") + f"; wall s {wall}")


def unlearn_units(ctx):
    """One unit per study: the teacher and the four methods, R runs each."""
    return [({"dataset": ctx.settings["dataset"], "model": s.model, "arch": s.arch, "poison": s.poison,
              "alpha": s.alpha}, f"{s.model} {s.arch} {s.poison} alpha={s.alpha}", functools.partial(_unlearn, ctx, s))
            for s in studies(ctx.settings)]


def _sweep(ctx, study, method, kl_w):
    rows = sweep_unit(ctx.data(ctx.settings["gauge"]), study, method, kl_w, ctx.settings["sweep"]["fo_w"], ctx.runs,
                      ctx.seed, teacher=ctx.teacher(study))
    return rows, "val_acc by fo_w " + mean_by(rows, "fo_w", "val_acc")


def sweep_units(ctx):
    """Label-flip studies only: scrub over kl_w x fo_w (a unit per kl_w), grad_ascent over fo_w."""
    units = []
    for study in studies(ctx.settings):
        if study.poison != "label_flip":
            continue
        for method, kl_ws in (("scrub", ctx.settings["sweep"]["kl_w"]), ("grad_ascent", [0.0])):
            for kl_w in kl_ws:
                key = {"dataset": ctx.settings["dataset"], "model": study.model, "method": method, "kl_w": kl_w}
                units.append((key, f"{study.model} {method} kl_w={kl_w}",
                              functools.partial(_sweep, ctx, study, method, kl_w)))
    return units

