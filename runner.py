"""The command line shared by the run scripts: presets, results folder, resume, progress, devices and Ray.

A study is a list of *units*, each a fixed set of trainings that yields rows of one CSV table. Rows are written
atomically by this (driver) process when a unit ends; a rerun with the same settings skips the finished units.
With ``--ray`` the pending units run as Ray tasks (each rebuilds what it needs from the settings) and return
their rows to the driver; with ``--devices`` the runs of every unit are split across local devices.
"""

import argparse
import copy
import csv
import functools
import json
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import fidelity

TABLES = {
    "phase": ("phase.csv", ["dataset", "gauge", "model", "arch", "poison", "alpha", "run", "train_acc", "val_acc"],
              ["dataset", "gauge", "model", "arch", "poison"]),
    "unlearn": ("unlearn.csv", ["dataset", "model", "arch", "poison", "alpha", "method", "run", "epoch", "train_acc",
                                "val_acc", "retain_acc", "forget_acc", "forget_poison_acc", "oracle_agree"],
                ["dataset", "model", "arch", "poison", "alpha"]),
    "sweep": ("sweep.csv", ["dataset", "model", "arch", "poison", "alpha", "method", "sweep", "param", "value", "kl_w",
                            "fo_w", "lr", "run", "val_acc", "forget_acc", "forget_poison_acc"],
              ["dataset", "model", "arch", "poison", "alpha", "method", "sweep", "kl_w"]),
    "audit": ("audit.csv", ["dataset", "model", "arch", "poison", "alpha", "method", "run", "mia_acc", "mia_auc",
                            "ulira_acc", "ulira_auc", "kl_oracle_val", "kl_oracle_forget", "oracle_agree",
                            "relearn_epochs", "relearn_capped", "unlearn_s", "grad_evals"],
              ["dataset", "model", "arch", "poison", "alpha"]),
    "hessian": ("hessian.csv", ["model", "arch", "alpha", "seed", "train_acc", "val_acc", "trace", "top_eig"],
                ["model", "arch"]),
}
"""part -> (file, columns, columns that identify a unit)."""

CHUNKS = {"runs": lambda runs: runs, "all": lambda runs: None}
"""``runs_per_program``: --runs runs per compiled program (quick, smoke: parts share programs, and on a CPU a
narrow program runs faster, its statevectors in cache), or all runs of a unit at once (paper: for accelerators)."""

PACKAGES = ("jax", "jaxlib", "tensorcircuit-ng", "optax", "numpy", "scipy", "scikit-learn", "pandas", "ray")
MAX_RUNS = 1024  # --runs above this is refused: memory grows with the runs of a unit


# ------------------------------------------------------------------------------------- presets
def schedule(epochs, batch, lr):
    """A training schedule as a preset field: epochs, minibatch size (None = the whole set), learning rate."""
    return {"epochs": epochs, "batch": batch, "lr": lr}


DROP = object()  # in a preset's overrides: remove this entry


def merged(base, changes):
    """A deep copy of the table ``base`` with ``changes`` applied: nested dicts merge, other values replace, and
    ``DROP`` removes an entry. Presets are the paper table plus a few such overrides."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------ results
class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message):
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


class Table:
    """A results CSV to which finished units are appended atomically (write a copy, then rename)."""

    def __init__(self, folder, part):
        name, self.columns, self.key_columns = TABLES[part]
        self.path = Path(folder) / name

    def unit_key(self, row):
        return tuple(str(row[c]) for c in self.key_columns)

    def done(self):
        if not self.path.exists():
            return set()
        with open(self.path, newline="") as f:
            return {self.unit_key(row) for row in csv.DictReader(f)}

    def append(self, rows):
        tmp = self.path.with_suffix(".csv.tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        with open(tmp, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


def save_arrays(path, new):
    """Add arrays to an npz file atomically (write a copy, then rename)."""
    old = dict(np.load(path)) if path.exists() else {}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **old, **new)
    os.replace(tmp, path)


def write_json(path, obj):
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def environment():
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    return {"python": platform.python_version(), "packages": versions,
            "device": f"{device.platform}: {getattr(device, 'device_kind', device)} x {jax.local_device_count()}"}


def open_results(out, settings, overwrite):
    """Create ``out`` with a config.json holding ``settings``; refuse other settings unless overwrite."""
    out = Path(out)
    config_path = out / "config.json"
    if config_path.exists():
        earlier = json.loads(config_path.read_text())
        if earlier.get("settings") != settings:
            if not overwrite:
                fail(f"{out} holds results made with other settings; use another --out, or --overwrite")
            for name, _, _ in TABLES.values():
                (out / name).unlink(missing_ok=True)
            (out / "hessian_spectra.npz").unlink(missing_ok=True)
            shutil.rmtree(out / "figures", ignore_errors=True)
            config_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_path.read_text()) if config_path.exists() else {"settings": settings, "wall_s": {}}
    config.update(environment())
    write_json(config_path, config)
    return config


# -------------------------------------------------------------------------------- command line
def parse_args(description, presets, parts, argv=None, extra=None):
    """Parse and check the command line; errors print one line and exit 2 before anything is written."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", help=f"settings table: {', '.join(presets)} (default quick)")
    parser.add_argument("--parts", default=",".join(parts),
                        help=f"comma-separated subset of {','.join(parts)} (default: all, in this order)")
    parser.add_argument("--out", help="results folder (default results/<dataset>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed from which every random draw derives (default 0)")
    parser.add_argument("--runs", type=int, help=f"independent runs per setting, 1 to {MAX_RUNS} (default: the "
                        "preset's)")
    parser.add_argument("--dtype", help="circuit precision, complex64 or complex128 (default: the preset's; paper "
                        "uses complex128 as the authors, quick and smoke complex64)")
    parser.add_argument("--fidelity", default="paper", choices=sorted(fidelity.FIDELITIES),
                        help="definitions: paper (what the authors' code computes, default) or corrected (our "
                        "repairs); see the README's Fidelity section")
    parser.add_argument("--devices", type=int, help="split the runs of every unit across this many local devices "
                        "(default: all; results are identical)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run units as Ray tasks: a local Ray instance, or the cluster at ADDRESS (host:port)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete earlier results in --out made with other settings instead of refusing")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.preset not in presets:
        parser.error(f"unknown preset {args.preset!r}; choose from {', '.join(presets)}")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in parts]
    if unknown or not args.parts:
        parser.error(f"unknown part {','.join(unknown) or '(none)'}; choose from {','.join(parts)}")
    if args.runs is not None and not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be between 1 and {MAX_RUNS}, got {args.runs}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be a non-negative integer below 2**63, got {args.seed}")
    args.dtype = args.dtype or presets[args.preset]["dtype"]
    if args.dtype not in ("complex64", "complex128"):
        parser.error(f"unknown dtype {args.dtype!r}; choose complex64 or complex128")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is an existing file, not a folder")
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    if args.ray not in (None, "local") and not reachable(args.ray):
        parser.error(f"cannot reach a Ray cluster at {args.ray}")
    return args


def reachable(address, timeout=5.0):
    """Whether a TCP connection to ``host:port`` (a Ray head's GCS address) opens within ``timeout`` seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def settings_for(args, presets, **extra):
    """The full settings of a run: the preset's table with the command line's overrides applied."""
    settings = copy.deepcopy(presets[args.preset])
    if args.runs is not None:
        settings["runs"] = args.runs
    settings.update(preset=args.preset, seed=args.seed, dtype=args.dtype,
                    fidelity=fidelity.FIDELITIES[args.fidelity].as_dict(), **extra)
    return settings


# ------------------------------------------------------------------------------------- context
class Context:
    """What the units of one run share: settings, datasets and teacher populations (made once each).

    ``load(settings, gauge)`` gives the clean dataset; ``study_data(ds, study, fid)`` (optional) the dataset a
    study trains on, when it differs (the authors' 13-qubit XXZ unlearning QNN).
    """

    def __init__(self, settings, load, study_data=None):
        self.settings, self.load = settings, load
        self.study_data = study_data or (lambda ds, study, fid: ds)
        self.fid = fidelity.Fidelity(**settings["fidelity"])
        self.seed, self.runs = settings["seed"], settings["runs"]
        self.chunk = CHUNKS[settings["runs_per_program"]](self.runs)  # runs per compiled program, every training
        self._data, self._populations = {}, {}

    def data(self, gauge=None):
        gauge = gauge or self.settings["gauge"]
        if gauge not in self._data:
            self._data[gauge] = self.load(self.settings, gauge)
        return self._data[gauge]

    def studies(self):
        import poison_unlearn as pu

        return [pu.Study(s["model"], s["arch"], s["poison"], s["alpha"], pu.Schedule(**s["teacher"]),
                         pu.Schedule(**s["unlearn"])) for s in self.settings["unlearn"]["studies"].values()]

    def study_dataset(self, study):
        return self.study_data(self.data(), study, self.fid)

    def population(self, study, runs=None, shared_teacher=None):
        """Teachers of a study (``runs``, default --runs): shared or per run as the fidelity says, unless told."""
        import poison_unlearn as pu

        shared = self.fid.teachers == "shared" if shared_teacher is None else shared_teacher
        key = (study, runs or self.runs, shared)
        if key not in self._populations:
            self._populations[key] = pu.train_teachers(self.study_dataset(study), study, runs=key[1], seed=self.seed,
                                                       fid=self.fid, shared_teacher=shared, chunk=self.chunk)
        return self._populations[key]


def mean_by(rows, column, metric):
    values = {}
    for row in rows:
        values.setdefault(row[column], []).append(row[metric])
    return " ".join(f"{k}:{np.nanmean(v):.2f}" for k, v in values.items())


# --------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """A unit of work: its key (the columns that identify its rows), a label, and ``work(ctx) -> Done`` (a
    picklable partial of a module-level function, so that a Ray worker can run it too)."""

    key: dict
    label: str
    work: object


class Done(NamedTuple):
    """What a unit returns to the driver: its rows, a one-line summary, wall seconds of its pieces, and arrays to
    add to npz files of the results folder (file name -> name -> array)."""

    rows: list
    info: str
    timings: dict = {}
    arrays: dict = {}


def _phase(ctx, spec, gauge, poison):
    import poison_unlearn as pu

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


def _unlearn(ctx, study):
    import poison_unlearn as pu

    rows, outcomes = pu.unlearn_unit(ctx.study_dataset(study), study, ctx.population(study),
                                     method_names=ctx.settings["methods"], seed=ctx.seed, fid=ctx.fid,
                                     chunk=ctx.chunk)
    final = [r for r in rows if r["epoch"] == study.unlearn.epochs]
    timings = {f"{study.model} {study.arch} {study.poison} {m}": {"run_s": round(o.run_s, 3),
                                                                   "compile_s": round(o.compile_s, 2)}
               for m, o in outcomes.items()}
    return Done(rows, "final val_acc " + mean_by(final, "method", "val_acc") + "; forget_poison_acc "
                + mean_by(final, "method", "forget_poison_acc"), timings)


def study_key(ctx, study):
    return {"dataset": ctx.settings["dataset"], "model": study.model, "arch": study.arch, "poison": study.poison,
            "alpha": study.alpha}


def study_units(ctx, work):
    """One unit per unlearning study, running ``work(ctx, study=...)``."""
    return [Unit(study_key(ctx, s), f"{s.model} {s.arch} {s.poison} alpha={s.alpha}", functools.partial(work, study=s))
            for s in ctx.studies()]


def unlearn_units(ctx):
    """One unit per study: the teacher and every method, R runs each."""
    return study_units(ctx, _unlearn)


def _sweep(ctx, study, method, sweep, param, values, fixed):
    import poison_unlearn as pu

    rows = pu.sweep_unit(ctx.study_dataset(study), study, ctx.population(study), method, sweep=sweep, param=param,
                         values=values, seed=ctx.seed, fid=ctx.fid, fixed=fixed, chunk=ctx.chunk)
    return Done(rows, f"val_acc by {param} " + mean_by(rows, "value", "val_acc"))


def sweep_plan(ctx, study):
    """(method, sweep, parameter, values, fixed hyper-parameters) of a study's sweeps: the paper's weight grids
    (SCRUB kl_w x fo_w, a unit per kl_w; gradient ascent over fo_w), every other method's key hyper-parameter,
    and the learning rate of every method that trains (factors of the study's rate; one-shot steps have none)."""
    import methods

    cfg, names = ctx.settings["sweep"], ctx.settings["methods"]
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
    import methods

    units = []
    for study in ctx.studies():
        for method, sweep, param, values, fixed in sweep_plan(ctx, study):
            kl_w = fixed.get("kl_w", methods.METHODS[method].hparams.get("kl_w", float("nan")))
            key = study_key(ctx, study) | {"method": method, "sweep": sweep, "kl_w": float(kl_w)}
            units.append(Unit(key, f"{study.model} {study.poison} {method} {sweep} {param}"
                              + (f" kl_w={kl_w}" if sweep == "weights" else ""),
                              functools.partial(_sweep, study=study, method=method, sweep=sweep, param=param,
                                                values=values, fixed=fixed)))
    return units


def _audit(ctx, study):
    import audit

    rows, seconds = audit.audit_unit(ctx, study)
    return Done(rows, "mia_auc " + mean_by(rows, "method", "mia_auc") + "; ulira_acc "
                + mean_by(rows, "method", "ulira_acc"), {f"audit {study.model} {study.arch} {study.poison}": seconds})


def audit_units(ctx):
    """One unit per study: K shadow runs of teacher, oracle retrain and every method, then the attacks."""
    return study_units(ctx, _audit)


def hessian_units(ctx):
    import hessian

    return hessian.hessian_units(ctx)


UNITS = {"phase": phase_units, "unlearn": unlearn_units, "sweep": sweep_units, "audit": audit_units,
         "hessian": hessian_units}


# ---------------------------------------------------------------------------------- execution
_WORKER = {}  # a Ray worker's contexts, by settings: teachers and data are made once per worker


def _on_worker(settings, load, study_data, part, index, devices, fail_once_dir):
    """A Ray task: rebuild the context (cached per worker process) and run unit ``index`` of ``part``."""
    import models

    if fail_once_dir:  # fault injection for the retry test: the first attempt of every unit kills its worker
        marker = Path(fail_once_dir) / f"{part}-{index}"
        if not marker.exists():
            marker.touch()
            os._exit(1)
    key = json.dumps(settings, sort_keys=True)
    if key not in _WORKER:
        models.keep_freed_memory()
        models.cache_compilations()
        models.set_precision(settings["dtype"])
        models.use_devices(devices)
        _WORKER.clear()
        _WORKER[key] = Context(settings, load, study_data)
    unit = UNITS[part](_WORKER[key])[index]
    start = time.perf_counter()
    return unit.work(_WORKER[key]), time.perf_counter() - start


def run_part(out, part, ctx, config, *, ray=None, devices=None):
    """Run the pending units of a part, serially or as Ray tasks; the driver appends each unit's rows."""
    table = Table(out, part)
    done = table.done()
    units = UNITS[part](ctx)
    pending = [i for i, u in enumerate(units) if table.unit_key(u.key) not in done]
    start = time.perf_counter()
    bar = tqdm(total=len(units), initial=len(units) - len(pending), desc=part, unit="unit")
    for index, (done_unit, seconds) in _results(part, ctx, units, pending, ray, devices):
        for name, arrays in done_unit.arrays.items():  # before the rows: finished rows imply their arrays
            save_arrays(Path(out) / name, arrays)
        table.append(done_unit.rows)
        bar.update()
        tqdm.write(f"[{part}] {units[index].label}: {done_unit.info} ({seconds:.1f} s)")
        config.setdefault("unit_wall_s", {})[f"{part}: {units[index].label}"] = round(seconds, 2)
        config.setdefault("method_s", {}).update(done_unit.timings)
    bar.close()
    config["wall_s"][part] = round(config["wall_s"].get(part, 0) + time.perf_counter() - start, 2)
    return table.path


def _results(part, ctx, units, pending, ray, devices):
    """(index, (Done, seconds)) of each pending unit as it finishes."""
    if ray is None:
        for index in pending:
            start = time.perf_counter()
            yield index, (units[index].work(ctx), time.perf_counter() - start)
        return
    task = ray.remote(max_retries=3)(_on_worker)
    refs = {task.remote(ctx.settings, ctx.load, ctx.study_data, part, i, devices,
                        os.environ.get("QMU_FAIL_ONCE_DIR")): i for i in pending}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        index = refs.pop(ready[0])
        yield index, ray.get(ready[0])


def start_ray(address):
    """Connect to the Ray cluster at ``address`` or start a local instance (``"local"``)."""
    import ray

    root = str(Path(__file__).resolve().parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                        **{k: v for k, v in os.environ.items() if k in ("QMU_CACHE", "MNIST_PATH", "XLA_FLAGS")}}}
    if address == "local":
        ray.init(runtime_env=env, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    else:
        try:
            ray.init(address=address, runtime_env=env | {"working_dir": root, "excludes": ["results", ".cache"]},
                     logging_level="ERROR")
        except (ConnectionError, RuntimeError) as err:
            fail(f"cannot reach a Ray cluster at {address}: {str(err).splitlines()[0]}")
    return ray


def main(dataset, description, presets, load, parts, argv=None, extra=None, extra_settings=None, study_data=None):
    """Run the ``parts`` of a study named on the command line into the results folder."""
    import models
    import plots

    args = parse_args(description, presets, parts, argv, extra)
    models.keep_freed_memory()
    models.cache_compilations()
    try:
        devices = models.use_devices(args.devices)
    except ValueError as err:
        fail(str(err))
    models.set_precision(args.dtype)
    settings = settings_for(args, presets, dataset=dataset, **(extra_settings(args) if extra_settings else {}))
    out = Path(args.out or Path("results") / dataset)
    config = open_results(out, settings, args.overwrite)
    config["execution"] = {"devices": devices, "ray": args.ray}
    ray = start_ray(args.ray) if args.ray else None
    ctx = Context(settings, load, study_data)
    started = time.perf_counter()
    for part in args.parts:
        csv_path = run_part(out, part, ctx, config, ray=ray, devices=args.devices)
        write_json(out / "config.json", config)
        figure = plots.save_part_figure(out, part, csv_path)
        print(f"[{part}] rows in {csv_path}" + (f", figure {figure}" if figure else ""))
    if ray is not None:
        ray.shutdown()
    print(f"done in {time.perf_counter() - started:.0f} s; results in {out}/")
    return out
