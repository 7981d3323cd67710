"""What each part of a study is made of: its table, its units, and the run's context they share.

A study is a list of *units*, each a fixed set of trainings that yields rows of one CSV table. ``PARTS`` maps each
part name to a :class:`Part`: its file, columns, the columns that identify a unit, and ``build_units(ctx)``. A
unit's ``work(ctx)`` is a picklable partial of a module-level function, so that a Ray worker can rebuild its
context from the settings and run it too; workers look units up by key.
"""

import functools
import threading
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

import audit
import circuits
import controls
import fidelity
import hessian
import methods
import models
import poison_unlearn as pu

CHUNKS = {"runs": lambda runs: runs, "all": lambda runs: None}
"""``runs_per_program``: --runs runs per compiled program (quick, smoke: parts share programs, and on a CPU a
narrow program runs faster, its statevectors in cache), or all runs of a unit at once (paper: for accelerators)."""


# ------------------------------------------------------------------------------------- context
class Context:
    """What the units of one run share: settings, datasets and teacher populations (made once each).

    ``load(settings, gauge)`` gives the clean dataset; ``study_data(ds, study, fid)`` (optional) the dataset a
    study trains on, when it differs (the authors' 13-qubit XXZ unlearning QNN).
    """

    def __init__(self, settings, load, study_data=None):
        self.settings, self.load = settings, load
        self.study_data = study_data or (lambda ds, study, fid: ds)
        self.fid = fidelity.from_settings(settings)
        self.seed, self.runs = settings["seed"], settings["runs"]
        self.chunk = CHUNKS[settings["runs_per_program"]](self.runs)  # runs per compiled program, every training
        self._data, self._populations = {}, {}
        self._loading, self._training = threading.Lock(), {}  # units may run in threads (runner --jobs)

    def data(self, gauge=None):
        gauge = gauge or self.settings["gauge"]
        with self._loading:  # one at a time: gauges of a dataset share its cache file
            if gauge not in self._data:
                self._data[gauge] = self.load(self.settings, gauge)
        return self._data[gauge]

    def studies(self, swept=False):
        """The unlearning studies (``swept``: only those the sweep part covers; a study without a ``sweep`` field,
        as the paper's, is swept)."""
        return [pu.Study(s["model"], s["arch"], s["poison"], s["alpha"], pu.Schedule(**s["teacher"]),
                         pu.Schedule(**s["unlearn"]), s.get("recipe", "plain"))
                for s in self.settings["unlearn"]["studies"].values() if s.get("sweep", True) or not swept]

    def study_dataset(self, study):
        return self.study_data(self.data(), study, self.fid)

    def population(self, study, runs=None, shared_teacher=None):
        """Teachers of a study (``runs``, default --runs): shared or per run as the fidelity says, unless told."""
        shared = self.fid.teachers == "shared" if shared_teacher is None else shared_teacher
        key = (study, runs or self.runs, shared)
        with self._training.setdefault(key, threading.Lock()):  # a unit that needs teachers in training waits
            if key not in self._populations:
                ds = self.study_dataset(study)
                defences = TEACHER_RECIPES[study.recipe](self, ds, study, pu.teacher_count(key[1], shared))
                self._populations[key] = pu.train_teachers(ds, study, runs=key[1], seed=self.seed, fid=self.fid,
                                                           shared_teacher=shared, defences=defences, chunk=self.chunk)
        return self._populations[key]


def tuned_teachers(ctx, ds, study, count):
    """Each teacher's defence, picked by cross-validation on its poisoned set (the controls' grid)."""
    return controls.tuned_choices(ds, study, runs=count, seed=ctx.seed, fid=ctx.fid,
                                  cv_cfg=ctx.settings["controls"]["cv"], chunk=ctx.chunk)


TEACHER_RECIPES = {"plain": lambda ctx, ds, study, count: None, "tuned": tuned_teachers}
"""How a study's teachers train (its ``recipe``): the model's own recipe, or the MLP's cross-validated defence."""


def mean_by(rows, column, metric):
    values = {}
    for row in rows:
        values.setdefault(row[column], []).append(row[metric])
    return " ".join(f"{k}:{np.nanmean(v):.2f}" for k, v in values.items())


# --------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """A unit of work: its key (the columns that identify its rows), a label, ``work(ctx) -> Done``, and the
    precision it runs in (None: the run's ``--dtype``)."""

    key: dict
    label: str
    work: object
    precision: str | None = None


class Done(NamedTuple):
    """What a unit returns to the driver: its rows, a one-line summary, wall seconds of its pieces, arrays to add
    to npz files of the results folder (file name -> name -> array), and text files to write (path -> text)."""

    rows: list
    info: str
    timings: dict = {}
    arrays: dict = {}
    files: dict = {}


def run_unit(ctx, unit):
    """``unit.work(ctx)`` in the unit's precision, or the run's: threads of one precision run together, and a
    unit of another waits for them (``models.precision``)."""
    with models.precision(unit.precision or ctx.settings["dtype"]):
        return unit.work(ctx)


def _phase(ctx, spec, gauge, poison):
    rows = pu.resilience_unit(ctx.data(gauge), spec["model"], spec["arch"], poison, ctx.settings["phase"]["alphas"],
                              runs=ctx.runs, schedule=pu.Schedule(**spec["schedule"]), seed=ctx.seed, fid=ctx.fid,
                              chunk=ctx.chunk)
    return Done(rows, "val_acc by alpha " + mean_by(rows, "alpha", "val_acc"))


def phase_units(ctx):
    """One unit per (model, architecture, gauge, poison): every alpha and run trained at once."""
    units = []
    for spec in ctx.settings["phase"]["models"].values():
        gauge = spec.get("gauge", ctx.settings["gauge"])
        for poison in spec.get("poisons", ctx.settings["phase"]["poisons"]):
            key = {"dataset": ctx.settings["dataset"], "gauge": gauge, "model": spec["model"], "arch": spec["arch"],
                   "poison": poison}
            units.append(Unit(key, f"{spec['model']} {spec['arch']} {gauge} {poison}",
                              functools.partial(_phase, spec=spec, gauge=gauge, poison=poison)))
    return units


def exported_circuits(ctx, study, pop):
    """With --export-circuits, each QNN teacher of a study as OpenQASM (``circuits/``), else nothing."""
    qnn = getattr(pop.model, "qnn", pop.model)  # a QNN measured on a device exports its circuit
    if not ctx.settings["export_circuits"] or not isinstance(qnn, models.QNN):
        return {}
    name = f"circuits/{study.model}-{study.arch}-{study.recipe}-{study.poison}-alpha{study.alpha}"
    return {f"{name}-teacher{k}.qasm": circuits.to_openqasm(qnn, pop.params[k])
            for k in range(pu.teacher_count(pop.runs, ctx.fid.teachers == "shared"))}


def _unlearn(ctx, study):
    pop = ctx.population(study)
    rows, outcomes = pu.unlearn_unit(ctx.study_dataset(study), study, pop,
                                     method_names=ctx.settings["methods"], seed=ctx.seed, fid=ctx.fid,
                                     chunk=ctx.chunk)
    final = [r for r in rows if r["epoch"] == study.unlearn.epochs]
    timings = {f"{study.model} {study.arch} {study.recipe} {study.poison} {m}": {"run_s": round(o.run_s, 3),
                                                                   "compile_s": round(o.compile_s, 2)}
               for m, o in outcomes.items()}
    return Done(rows, "final val_acc " + mean_by(final, "method", "val_acc") + "; forget_poison_acc "
                + mean_by(final, "method", "forget_poison_acc"), timings, files=exported_circuits(ctx, study, pop))


def study_key(ctx, study):
    return {"dataset": ctx.settings["dataset"], "model": study.model, "arch": study.arch, "recipe": study.recipe,
            "poison": study.poison, "alpha": study.alpha}


def study_units(ctx, work):
    """One unit per unlearning study, running ``work(ctx, study=...)``."""
    return [Unit(study_key(ctx, s), f"{s.model} {s.arch} {s.recipe} {s.poison} alpha={s.alpha}",
                 functools.partial(work, study=s)) for s in ctx.studies()]


def unlearn_units(ctx):
    """One unit per study: the teacher and every method, R runs each."""
    return study_units(ctx, _unlearn)


def _sweep(ctx, study, method, sweep, param, values, fixed):
    rows = pu.sweep_unit(ctx.study_dataset(study), study, ctx.population(study), method, sweep=sweep, param=param,
                         values=values, seed=ctx.seed, fid=ctx.fid, fixed=fixed, chunk=ctx.chunk)
    return Done(rows, f"val_acc by {param} " + mean_by(rows, "value", "val_acc"))


def sweep_plan(settings, study):
    """(method, sweep, parameter, values, fixed hyper-parameters) of a study's sweeps: the paper's weight grids
    (SCRUB kl_w x fo_w, a unit per kl_w; gradient ascent over fo_w), every other method's key hyper-parameter,
    and the learning rate of every method that trains (factors of the study's rate; one-shot steps have none)."""
    cfg, names = settings["sweep"], settings["methods"]
    lines = []
    if "scrub" in names:
        lines += [("scrub", "weights", "fo_w", cfg["fo_w"], {"kl_w": kl_w}) for kl_w in cfg["kl_w"]]
    if "grad_ascent" in names:
        lines.append(("grad_ascent", "weights", "fo_w", cfg["fo_w"], {"kl_w": 0.0}))
    for name in names:
        method = methods.METHODS[name]
        if method.key and not method.paper:
            lines.append((name, "hparam", method.key, pick(method.grid, cfg["hparam_points"]), {}))
    lrs = [round(study.unlearn.lr * f, 8) for f in cfg["lr_factors"]]
    lines += [(name, "lr", "lr", lrs, {}) for name in names if methods.METHODS[name].step is None]
    return lines


def pick(grid, count):
    """``count`` values spread evenly over ``grid`` (its ends included), or all of it."""
    if count >= len(grid):
        return list(grid)
    return [grid[i] for i in np.linspace(0, len(grid) - 1, count).round().astype(int)]


def sweep_units(ctx):
    """One unit per (study, method, sweep line): one compiled computation over the line's values and runs."""
    units = []
    for study in ctx.studies(swept=True):
        for method, sweep, param, values, fixed in sweep_plan(ctx.settings, study):
            kl_w = fixed.get("kl_w", methods.METHODS[method].hparams.get("kl_w", float("nan")))
            key = study_key(ctx, study) | {"method": method, "sweep": sweep, "kl_w": float(kl_w)}
            units.append(Unit(key, f"{study.model} {study.arch} {study.recipe} {study.poison} {method} {sweep} {param}"
                              + (f" kl_w={kl_w}" if sweep == "weights" else ""),
                              functools.partial(_sweep, study=study, method=method, sweep=sweep, param=param,
                                                values=values, fixed=fixed)))
    return units


def _audit(ctx, study):
    cfg = ctx.settings["audit"]
    rows, seconds = audit.audit_unit(ctx.study_dataset(study), study,
                                     ctx.population(study, runs=cfg["shadows"], shared_teacher=False),
                                     method_names=ctx.settings["methods"], folds=cfg["folds"],
                                     relearn_cap=cfg["relearn_epochs"], seed=ctx.seed, fid=ctx.fid, chunk=ctx.chunk)
    return Done(rows, "mia_auc " + mean_by(rows, "method", "mia_auc") + "; ulira_acc "
                + mean_by(rows, "method", "ulira_acc"), {f"audit {study.model} {study.arch} {study.recipe} {study.poison}": seconds})


def audit_units(ctx):
    """One unit per study: K shadow runs of teacher, oracle retrain and every method, then the attacks."""
    return study_units(ctx, _audit)


def _controls(ctx, spec, gauge, poison):
    cfg = ctx.settings["controls"]
    rows = controls.FITS[spec["fit"]](ctx.data(gauge), spec, poison, spec.get("alphas", cfg["alphas"]), runs=ctx.runs,
                                      seed=ctx.seed, fid=ctx.fid, cv_cfg=cfg["cv"], chunk=ctx.chunk)
    return Done(rows, "val_acc by alpha " + mean_by(rows, "alpha", "val_acc"))


def controls_units(ctx):
    """One unit per (control, gauge, poison): every alpha and run (and, for the MLP's defences, every recipe)."""
    units, cfg = [], ctx.settings["controls"]
    for spec in cfg["models"].values():
        gauge = spec.get("gauge", ctx.settings["gauge"])
        arch = controls.control_arch(ctx.data(gauge), spec, cfg["cv"])
        for poison in spec.get("poisons", cfg["poisons"]):
            key = {"dataset": ctx.settings["dataset"], "gauge": gauge, "model": spec["model"], "arch": arch,
                   "poison": poison}
            units.append(Unit(key, f"{spec['model']} {arch} {spec['recipe']} {gauge} {poison}",
                              functools.partial(_controls, spec=spec, gauge=gauge, poison=poison)))
    return units


def _memorise(ctx, spec):
    cfg = ctx.settings["memorise"]
    rows = controls.memorise_unit(ctx.data(), spec, n_trains=spec.get("n_train", cfg["n_train"]), runs=ctx.runs,
                                  factor=cfg["factor"], seed=ctx.seed, fid=ctx.fid, chunk=ctx.chunk)
    return Done(rows, "random_fit by n_train " + mean_by(rows, "n_train", "random_fit"))


def memorise_units(ctx):
    """One unit per model of the memorisation test: every n_train, run and the two epoch budgets."""
    return [Unit({"dataset": ctx.settings["dataset"], "model": spec["model"], "arch": spec["arch"]},
                 f"{spec['model']} {spec['arch']}", functools.partial(_memorise, spec=spec))
            for spec in ctx.settings["memorise"]["models"].values()]


def device_point(ctx, point):
    """The fidelity of one point of the device grid (``noise``, ``shots``; the rest from the run's device), and
    its columns. Every point trains from the same draws (initialisations, orders, measurement keys): the grid
    compares the devices on common random numbers."""
    device = models.Device(**(ctx.settings["device"] | point))
    return replace(ctx.fid, device=device), {"noise": device.noise, "shots": device.shots or "exact",
                                             "shot_grad": device.shot_grad}


def named_study(ctx, name):
    return next(s for key, s in zip(ctx.settings["unlearn"]["studies"], ctx.studies(), strict=True) if key == name)


def _device_phase(ctx, point):
    cfg = ctx.settings["device_grid"]
    fid, columns = device_point(ctx, point)
    spec = ctx.settings["phase"]["models"][cfg["phase_model"]]
    rows = pu.resilience_unit(ctx.data(), spec["model"], spec["arch"], "label_flip", cfg["alphas"], runs=ctx.runs,
                              schedule=pu.Schedule(**spec["schedule"]), seed=ctx.seed, fid=fid, chunk=ctx.chunk)
    return Done([row | columns for row in rows], "val_acc by alpha " + mean_by(rows, "alpha", "val_acc"))


def _device_unlearn(ctx, point):
    fid, columns = device_point(ctx, point)
    study = named_study(ctx, ctx.settings["device_grid"]["study"])
    ds = ctx.study_dataset(study)
    pop = pu.train_teachers(ds, study, runs=ctx.runs, seed=ctx.seed, fid=fid, shared_teacher=fid.teachers == "shared",
                            chunk=ctx.chunk)
    rows, _ = pu.unlearn_unit(ds, study, pop, method_names=methods.PAPER_METHODS, seed=ctx.seed, fid=fid,
                              chunk=ctx.chunk)
    final = [r for r in rows if r["epoch"] == study.unlearn.epochs]
    return Done([row | columns for row in rows], "final val_acc " + mean_by(final, "method", "val_acc")
                + "; forget_poison_acc " + mean_by(final, "method", "forget_poison_acc"))


def _device_audit(ctx, point):
    cfg, audit_cfg = ctx.settings["device_grid"], ctx.settings["audit"]
    fid, columns = device_point(ctx, point)
    study = named_study(ctx, cfg["study"])
    ds = ctx.study_dataset(study)
    pop = pu.train_teachers(ds, study, runs=audit_cfg["shadows"], seed=ctx.seed, fid=fid, shared_teacher=False,
                            chunk=ctx.chunk)
    rows, _ = audit.audit_unit(ds, study, pop, method_names=cfg["audit_methods"], folds=audit_cfg["folds"],
                               relearn_cap=audit_cfg["relearn_epochs"], seed=ctx.seed, fid=fid, chunk=ctx.chunk)
    return Done([row | columns for row in rows], "mia_auc " + mean_by(rows, "method", "mia_auc") + "; ulira_acc "
                + mean_by(rows, "method", "ulira_acc"))


def device_units(work, points_key):
    """Units of a device part: one per point of the grid's ``points_key`` list."""
    def build(ctx):
        return [Unit({"dataset": ctx.settings["dataset"], "noise": p["noise"], "shots": p["shots"] or "exact"},
                     f"noise={p['noise']} shots={p['shots'] or 'exact'}", functools.partial(work, point=p))
                for p in ctx.settings["device_grid"][points_key]]

    return build


def _hessian(ctx, spec):
    rows, spectra = hessian.hessian_unit(ctx.settings, spec, chunk=ctx.chunk)
    return Done(rows, "trace by alpha " + mean_by(rows, "alpha", "trace"), arrays={"hessian_spectra.npz": spectra})


def hessian_units(ctx):
    """One unit per model of the Hessian study, in complex128 (the authors' precision for it)."""
    return [Unit({"model": spec["model"], "arch": spec["arch"]}, f"{spec['model']} {spec['arch']}",
                 functools.partial(_hessian, spec=spec), precision="complex128")
            for spec in ctx.settings["hessian"]["models"].values()]


# ------------------------------------------------------------------------------------ the parts
@dataclass(frozen=True)
class Part:
    """A part of a study: its results file, columns, the columns that identify a unit, and its units."""

    file: str
    columns: tuple
    key_columns: tuple
    build_units: object

    def unit_key(self, key):
        return tuple(str(key[c]) for c in self.key_columns)


STUDY = ("dataset", "model", "arch", "recipe", "poison", "alpha")
DEVICE = ("dataset", "noise", "shots")
UNLEARN_COLUMNS = (*STUDY, "method", "run", "epoch", "train_acc", "val_acc", "retain_acc", "forget_acc",
                 "forget_poison_acc", "oracle_agree")
AUDIT_COLUMNS = (*STUDY, "method", "run", "mia_acc", "mia_auc", "ulira_acc", "ulira_auc", "kl_oracle_val",
               "kl_oracle_forget", "oracle_agree", "relearn_epochs", "relearn_capped", "unlearn_s", "grad_evals")
PART_GROUPS = {"device": ("device_phase", "device_unlearn", "device_audit")}
"""Names that stand for several parts on the command line (--parts device)."""
PARTS = {
    "phase": Part("phase.csv", ("dataset", "gauge", "model", "arch", "poison", "alpha", "run", "train_acc",
                                "val_acc", "flip_fit"), ("dataset", "gauge", "model", "arch", "poison"), phase_units),
    "controls": Part("controls.csv", ("dataset", "gauge", "model", "arch", "recipe", "params", "poison", "alpha", "run",
                                      "train_acc", "val_acc", "flip_fit", "choice"),
                     ("dataset", "gauge", "model", "arch", "poison"), controls_units),
    "memorise": Part("memorise.csv", ("dataset", "model", "arch", "recipe", "params", "n_train", "run", "random_fit",
                                      "epochs"), ("dataset", "model", "arch"), memorise_units),
    "unlearn": Part("unlearn.csv", UNLEARN_COLUMNS, STUDY, unlearn_units),
    "sweep": Part("sweep.csv", (*STUDY, "method", "sweep", "param", "value", "kl_w", "fo_w", "lr", "run", "val_acc",
                                "forget_acc", "forget_poison_acc"), (*STUDY, "method", "sweep", "kl_w"), sweep_units),
    "audit": Part("audit.csv", AUDIT_COLUMNS, STUDY, audit_units),
    "device_phase": Part("device.csv", ("dataset", "gauge", "model", "arch", "noise", "shots", "shot_grad", "poison",
                                        "alpha", "run", "train_acc", "val_acc", "flip_fit"), DEVICE,
                         device_units(_device_phase, "points")),
    "device_unlearn": Part("device_unlearn.csv", (*UNLEARN_COLUMNS, "noise", "shots", "shot_grad"), DEVICE,
                           device_units(_device_unlearn, "points")),
    "device_audit": Part("device_audit.csv", (*AUDIT_COLUMNS, "noise", "shots", "shot_grad"), DEVICE,
                         device_units(_device_audit, "audit_points")),
    "hessian": Part("hessian.csv", ("model", "arch", "alpha", "seed", "train_acc", "val_acc", "trace", "top_eig"),
                    ("model", "arch"), hessian_units),
}


def find_unit(ctx, part, key):
    """The unit of ``part`` whose key is ``key`` (a Ray worker's lookup: by identity, not by list position)."""
    wanted = PARTS[part].unit_key(key)
    return next(u for u in PARTS[part].build_units(ctx) if PARTS[part].unit_key(u.key) == wanted)
