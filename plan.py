"""``--plan``: the size of a run before it starts, and its predicted wall time on this machine; writes nothing.

Every unit of the chosen parts runs with :class:`Tally` as the engine's executor (``models.EXECUTOR``): each
program is traced but not compiled or run (``jax.eval_shape``; it returns zeros), its compilation is counted once
per run, and its work, in sample-gradient evaluations, is summed per model. Host work (loading data, the plans of
minibatches, the attacks' statistics, cross-validation's bookkeeping) runs as in a real run and is timed.

A calibration of a few seconds then prices that work. For each family of models (a model class) it compiles and
times one training program of the family, cut to a few steps: its compile seconds, and its rate in floating-point
operations per second, where a model's operations per sample-gradient come from XLA's cost analysis
of its gradient on one sample. Predicted seconds of a part = host seconds + each model's work times its operations
per sample-gradient over its family's rate + its new compilations times the family's compile seconds. It assumes an
empty compilation cache (a rerun that finds its programs on disk compiles less) and one unit at a time (``--jobs
1``; two at a time overlap one's compilation with another's run, and finish sooner).
"""

import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import models
import units

CALIBRATION_STEPS = 8  # minibatch steps of the calibration's program
CALIBRATION_RUNS = 2  # runs of the calibration's program (MIN_RUNS_PER_DEVICE: a narrower batch compiles otherwise)
CALIBRATION_SECONDS = 0.5  # the calibration runs its program until it has timed at least this long


def family(model):
    """The models priced alike: those of one class (a QNN's circuit, a QNN measured on a device, the MLP's matrix
    products and each observable run at rates of their own)."""
    return type(model).__name__


def key_model(key):
    """The model a program's key is for: a Trainer's, or the first model in a tuple key."""
    for part in key if isinstance(key, tuple) else (key,):
        if isinstance(part, models.Trainer):
            return part.model
        if hasattr(part, "logits"):
            return part
        if hasattr(part, "model"):  # a hessian.Landscape
            return part.model
    raise ValueError(f"no model in the program key {key!r}")


def example_row(inputs, mapped):
    """One sample of a program's inputs (the first ``*x`` entry of a dict, or the array itself): first run's first
    row when ``mapped`` (a leading run axis), else the first row."""
    if isinstance(inputs, dict):
        inputs = next(v for k, v in inputs.items() if k.endswith("x"))
    return jax.tree.map(lambda a: a[0, :1] if mapped else a[:1], inputs)


def program_size(lowered):
    """The length of a lowered program's text (StableHLO): compile time grows with it."""
    return len(lowered.as_text())


def zeros_like_shapes(shapes):
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@dataclass
class Tally:
    """The executor of a plan (``models.Executor``'s interface): traces each program once, counts its compilation
    and work, and runs nothing."""

    shapes: dict = field(default_factory=dict)  # compile key -> output shapes
    sizes: dict = field(default_factory=dict)  # compile key -> the size of its lowered program (what XLA compiles)
    program_models: dict = field(default_factory=dict)  # compile key -> the model it is for
    work: Counter = field(default_factory=Counter)  # model -> sample-gradient evaluations (padded runs included)
    flops: dict = field(default_factory=dict)  # model -> operations per sample-gradient
    flops_s: float = 0.0  # seconds spent counting them (the calibration's, not the run's)
    probes: dict = field(default_factory=dict)  # family -> (work, model, program, cut arguments, their work)
    trainings: int = 0

    def _record(self, key, program, args, work, mapped):
        ckey = models.compile_key(key, args)
        if ckey not in self.shapes:
            lowered = jax.jit(program).lower(*args)
            self.shapes[ckey], self.sizes[ckey] = lowered.out_info, program_size(lowered)
            self.program_models[ckey] = key_model(key)
        model = key_model(key)
        if model not in self.flops:  # counted here, in the precision the program runs in
            start = time.perf_counter()
            params = jax.tree.map(lambda a: a[0], args[0]) if mapped else args[0]
            self.flops[model] = gradient_flops(model, params, example_row(args[1], mapped))
            self.flops_s += time.perf_counter() - start
        self.work[model] += work
        return zeros_like_shapes(self.shapes[ckey])

    def run(self, key, program, args, *, runs, work):
        width = len(jax.tree.leaves(args)[0])
        outputs = self._record(key, program, args, work * width, mapped=True)
        if isinstance(key, models.Trainer):
            self.trainings += runs
            fam = family(key.model)
            if work * width > self.probes.get(fam, (0,))[0]:  # kept cut short: a run's arrays are freed as it goes
                self.probes[fam] = (work * width, key.model, program, *truncated(args))
        return outputs, 0.0, 0.0

    def call(self, key, fn, args, *, work):
        return self._record(key, fn, args, work, mapped=False)


@contextmanager
def executor(tally):
    """The engine's programs go to ``tally`` inside the block."""
    saved, models.EXECUTOR = models.EXECUTOR, tally
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # zeros for outputs: 0/0 in summaries
            warnings.simplefilter("ignore")
            yield tally
    finally:
        models.EXECUTOR = saved


@dataclass
class PartPlan:
    """What one part will do: units, trainings (runs trained), work per model, new compilations, host seconds."""

    part: str
    units: int
    trainings: int
    work: Counter
    compiles: Counter  # model -> new compilations
    compile_size: Counter  # model -> total size of the programs it compiles anew
    host_s: float
    predicted_s: float = 0.0  # set by predict

    @property
    def sample_gradients(self):
        return sum(self.work.values())


def tally_parts(ctx, parts):
    """A :class:`PartPlan` per part, every model's operations per sample-gradient and every family's probe, and the
    seconds spent counting operations."""
    plans, seen, flops, probes, flops_s = [], set(), {}, {}, 0.0
    for part in parts:
        start = time.perf_counter()
        with executor(Tally()) as tally:
            part_units = units.PARTS[part].build_units(ctx)
            for unit in part_units:
                units.run_unit(ctx, unit)
        new = [k for k in tally.shapes if k not in seen]
        seen.update(new)
        flops.update(tally.flops)
        flops_s += tally.flops_s
        for fam, probe in tally.probes.items():
            if probe[0] > probes.get(fam, (0,))[0]:
                probes[fam] = probe
        compiles, compile_size = Counter(), Counter()
        for k in new:
            compiles[tally.program_models[k]] += 1
            compile_size[tally.program_models[k]] += tally.sizes[k]
        plans.append(PartPlan(part, len(part_units), tally.trainings, tally.work, compiles, compile_size,
                              time.perf_counter() - start - tally.flops_s))
    return plans, flops, probes, flops_s


def gradient_flops(model, params, row):
    """XLA's count of floating-point operations of the loss gradient on one sample (forward and reverse pass)."""
    def loss(p, x):
        return jnp.sum(jnp.real(model.logits(p, x)))

    cost = jax.jit(jax.grad(loss)).lower(params, row).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return max(float(cost.get("flops", 0.0)), 1.0)


def truncated(args):
    """A training program's arguments cut to ``CALIBRATION_RUNS`` runs, one epoch of at most
    ``CALIBRATION_STEPS`` steps, recorded once; and the work of one run of it."""
    params, data, plan, lrs, aux, (shared, record) = args
    take = models.take_runs((params, data, plan, lrs, aux), np.arange(CALIBRATION_RUNS) % len(lrs))
    params, data, plan, lrs, aux = take
    plan = jax.tree.map(lambda a: a[:, :1, :CALIBRATION_STEPS], plan)
    work = plan["idx"][0].size + models.forward_rows(data) / 3
    return (params, data, plan, lrs, aux, (shared, np.ones(1, bool))), work


@contextmanager
def uncached():
    """Compile without the persistent compilation cache (a calibration times a compilation, not a cache read)."""
    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", saved)


@dataclass(frozen=True)
class Rate:
    """A family's measured speed: floating-point operations per second, and seconds per compilation."""

    flops_per_s: float
    compile_s: float  # the probe's
    compile_s_per_size: float  # seconds of compilation per unit of program size
    samples_per_s: float  # sample-gradient evaluations per second of the probe's model (for the report)


UNCALIBRATED = Rate(flops_per_s=1e9, compile_s=1.0, compile_s_per_size=1e-5, samples_per_s=1e3)
"""The rate assumed where no family trains (only closed-form parts: nothing to calibrate; their work is host work)."""


def calibrate(probe, flops):
    """Compile and time a family's probe (its largest training program, cut short by :func:`truncated`);
    ``flops``: the model's operations per sample-gradient."""
    _, _, program, args, work = probe
    start = time.perf_counter()
    lowered = program.lower(*args)
    with uncached():
        executable = lowered.compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(executable(*args))  # the first execution allocates
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < CALIBRATION_SECONDS:
        jax.block_until_ready(executable(*args))
        calls += 1
    run_s = (time.perf_counter() - start) / calls
    return Rate(work * CALIBRATION_RUNS * flops / run_s, compile_s, compile_s / program_size(lowered),
                work * CALIBRATION_RUNS / run_s)


def predict(ctx, parts):
    """The plan of ``parts`` of a run: a :class:`PartPlan` each, with ``predicted_s`` set, and the calibration."""
    plans, flops, probes, flops_s = tally_parts(ctx, parts)
    start = time.perf_counter()
    rates = {fam: calibrate(probe, flops[probe[1]]) for fam, probe in probes.items()}
    calibration_s = time.perf_counter() - start + flops_s
    fallback = next(iter(rates.values()), UNCALIBRATED)
    for p in plans:
        engine = sum(w * flops[m] / rates.get(family(m), fallback).flops_per_s for m, w in p.work.items())
        compiling = sum(size * rates.get(family(m), fallback).compile_s_per_size for m, size in p.compile_size.items())
        p.predicted_s = p.host_s + engine + compiling
    return plans, rates, calibration_s


def duration(seconds):
    """Seconds as a short text: seconds below 2 minutes, minutes below 2 hours, then hours."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(plans, rates, calibration_s):
    """The plan as a table: a line per part, then the total and the calibration."""
    lines = [f"{'part':<16}{'units':>6}{'trainings':>11}{'sample-gradients':>18}{'compiles':>10}{'predicted':>11}"]
    for p in plans:
        lines.append(f"{p.part:<16}{p.units:>6}{p.trainings:>11}{p.sample_gradients:>18.3g}"
                     f"{sum(p.compiles.values()):>10}{duration(p.predicted_s):>11}")
    lines.append(f"{'total':<16}{sum(p.units for p in plans):>6}{sum(p.trainings for p in plans):>11}"
                 f"{sum(p.sample_gradients for p in plans):>18.3g}{sum(sum(p.compiles.values()) for p in plans):>10}"
                 f"{duration(sum(p.predicted_s for p in plans)):>11}")
    lines.append("calibration (" + f"{calibration_s:.1f} s, " + jax.devices()[0].platform + "): " + "; ".join(
        f"{fam} {r.samples_per_s:,.0f} sample-gradients/s, {r.compile_s:.1f} s per compilation"
        for fam, r in rates.items())
        + "; from an empty compilation cache, one unit at a time")
    return "\n".join(lines)
