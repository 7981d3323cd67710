"""The command line shared by the run scripts: presets, results folder, resume, progress, figures.

A study is a list of *units*, each a fixed set of trainings that yields rows of one CSV table. Rows
are written atomically when a unit ends; a rerun with the same settings skips the finished units.
"""

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

TABLES = {
    "phase": ("phase.csv", ["dataset", "gauge", "model", "arch", "poison", "alpha", "run", "train_acc", "val_acc"],
              ["dataset", "gauge", "model", "arch", "poison"]),
    "unlearn": ("unlearn.csv", ["dataset", "model", "arch", "poison", "alpha", "method", "run", "epoch", "train_acc",
                                "val_acc", "retain_acc", "forget_acc", "forget_poison_acc", "oracle_agree"],
                ["dataset", "model", "arch", "poison", "alpha"]),
    "sweep": ("sweep.csv", ["dataset", "model", "method", "kl_w", "fo_w", "run", "val_acc", "forget_acc",
                            "forget_poison_acc"], ["dataset", "model", "method", "kl_w"]),
    "hessian": ("hessian.csv", ["model", "arch", "alpha", "seed", "train_acc", "val_acc", "trace", "top_eig"],
                ["model", "arch"]),
}
"""part -> (file, columns, columns that identify a unit)."""

PACKAGES = ("jax", "jaxlib", "tensorcircuit-ng", "optax", "numpy", "scipy", "scikit-learn", "pandas")


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


def parse_args(description, presets, parts, argv=None, extra=None):
    """Parse and check the command line; errors print one line and exit 2 before anything is written."""
    import models

    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", help=f"settings table: {', '.join(presets)} (default quick)")
    parser.add_argument("--parts", default=",".join(parts), help=f"comma-separated subset of {','.join(parts)} "
                        "(default: all)")
    parser.add_argument("--out", help="results folder (default results/<dataset>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed from which every random draw derives (default 0)")
    parser.add_argument("--runs", type=int, help="independent runs per setting (default: the preset's)")
    parser.add_argument("--dtype", default="complex64", help="circuit precision: complex64 (default) or complex128")
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
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.dtype not in models.PRECISIONS:
        parser.error(f"unknown dtype {args.dtype!r}; choose complex64 or complex128")
    return args


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
            "device": f"{device.platform}: {getattr(device, 'device_kind', device)}"}


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
            shutil.rmtree(out / "figures", ignore_errors=True)
            config_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_path.read_text()) if config_path.exists() else {"settings": settings, "wall_s": {}}
    config.update(environment())
    write_json(config_path, config)
    return config


def write_json(path, obj):
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def run_part(out, part, units, config):
    """Run the pending units of a part: ``units`` is a list of (key row, description, thunk -> rows[, info])."""
    table = Table(out, part)
    done = table.done()
    pending = [u for u in units if table.unit_key(u[0]) not in done]
    start = time.perf_counter()
    bar = tqdm(pending, desc=f"{part}: {len(units) - len(pending)}/{len(units)} units done before", unit="unit")
    for _, label, thunk in bar:
        t0 = time.perf_counter()
        rows, info = thunk()
        table.append(rows)
        tqdm.write(f"[{part}] {label}: {info} ({time.perf_counter() - t0:.1f} s)")
        config.setdefault("unit_wall_s", {})[f"{part}: {label}"] = round(time.perf_counter() - t0, 2)
    config["wall_s"][part] = round(config["wall_s"].get(part, 0) + time.perf_counter() - start, 2)
    return table.path


def settings_for(args, presets, **extra):
    """The full settings of a run: the preset's table with the command line's overrides applied."""
    settings = json.loads(json.dumps(presets[args.preset]))
    if args.runs is not None:
        settings["runs"] = args.runs
    settings.update(preset=args.preset, seed=args.seed, dtype=args.dtype, **extra)
    return settings


def main(dataset, description, presets, load, parts, argv=None, extra=None, extra_settings=None):
    """Run the ``parts`` of a study named on the command line into the results folder."""
    import hessian
    import models
    import plots
    import poison_unlearn as pu

    units_of = {"phase": pu.phase_units, "unlearn": pu.unlearn_units, "sweep": pu.sweep_units,
                "hessian": hessian.hessian_units}
    args = parse_args(description, presets, parts, argv, extra)
    models.set_precision(args.dtype)
    settings = settings_for(args, presets, dataset=dataset, **(extra_settings(args) if extra_settings else {}))
    out = Path(args.out or Path("results") / dataset)
    config = open_results(out, settings, args.overwrite)
    ctx = pu.Context(settings, load, out)
    started = time.perf_counter()
    for part in args.parts:
        csv_path = run_part(out, part, units_of[part](ctx), config)
        config.setdefault("method_wall_s", {}).update(ctx.timings)
        write_json(out / "config.json", config)
        figure = plots.save_part_figure(out, part, csv_path)
        print(f"[{part}] rows in {csv_path}" + (f", figure {figure}" if figure else ""))
    print(f"done in {time.perf_counter() - started:.0f} s; results in {out}/")
    return out
