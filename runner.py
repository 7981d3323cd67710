"""The command line shared by the run scripts: parse, boot the process, run each part's pending units.

Rows are written atomically by this (driver) process when a unit ends; a rerun with the same settings skips the
finished units. With ``--ray`` the pending units run as Ray tasks (each rebuilds what it needs from the settings)
and return their rows to the driver; with ``--devices`` the runs of every unit are split across local devices.
Faults end in one line: bad input (exit 2, nothing written), Ctrl-C (130, the same command resumes), a full disk
(1, the folder and the space it needs).
"""

import argparse
import contextlib
import copy
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import jax
from tqdm import tqdm

import fidelity
import models
import plan
import plots
import results
import units

JOBS, MAX_JOBS = 2, 64  # units at a time in one process (--jobs), and the most allowed
UNIT_THREAD = "unit worker"  # the name of the threads that run units (in_threads)
MAX_RUNS = 1024  # --runs above this is refused: memory grows with the runs of a unit
RAY_CONNECT_S = 20.0  # a Ray cluster that does not answer within this is refused
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message, status=2):
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(status)


# -------------------------------------------------------------------------------- command line
def parse_args(description, presets, parts, argv=None, extra=None, optional=()):
    """Parse and check the command line; errors print one line and exit 2 before anything is written. ``parts``
    run by default, ``optional`` ones (or groups of ``units.PART_GROUPS``) only when named."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", help=f"settings table: {', '.join(presets)} (default quick)")
    parser.add_argument("--parts", default=",".join(parts),
                        help=f"comma-separated subset of {','.join([*parts, *optional])} (default: "
                        f"{','.join(parts)}, in this order)")
    parser.add_argument("--out", help="results folder (default results/<dataset>/); one run writes it at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed from which every random draw derives (default 0)")
    parser.add_argument("--runs", type=int, help=f"independent runs per setting, 1 to {MAX_RUNS} (default: the "
                        "preset's)")
    parser.add_argument("--dtype", help="circuit precision, complex64 or complex128 (default: the preset's; paper "
                        "uses complex128 as the authors, quick and smoke complex64)")
    parser.add_argument("--fidelity", default="paper", choices=sorted(fidelity.FIDELITIES),
                        help="definitions: paper (what the authors' code computes, default) or corrected (our "
                        "repairs); see the README's Fidelity section")
    parser.add_argument("--noise", help="gate and readout noise of every QNN: none (default), a profile (device: "
                        "p1 2e-4, p2 3e-3, r 1.5e-2; device10: ten times that) or p1=..,p2=..,r=..; see 'On a device'")
    parser.add_argument("--shots", type=int, help="measurements per QNN output (default: the exact expectation)")
    parser.add_argument("--shot-grad", choices=models.SHOT_GRADIENTS,
                        help="gradients from shots: surrogate (default; the loss at the shot estimate, the "
                        "expectation's gradient) or parameter_shift (2P shot-noisy circuits per sample, as hardware)")
    parser.add_argument("--export-circuits", action="store_true",
                        help="write each QNN teacher of the unlearn part as OpenQASM 2 into circuits/ of --out")
    parser.add_argument("--devices", type=int, help="split the runs of every unit across this many local devices "
                        "(default: all; results are identical)")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"units of a part run this many at a time in this "
                        f"process (default {JOBS}: one compiles while another runs; 1 halves the peak memory); "
                        "results are identical")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run units as Ray tasks: a local Ray instance on 127.0.0.1, or the cluster whose head "
                        "(GCS) listens at ADDRESS (host:port)")
    parser.add_argument("--plan", action="store_true",
                        help="print each part's units, trainings, sample-gradient evaluations and predicted wall time "
                        "on this machine (after a short calibration), then stop; writes nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete earlier results in --out made with other settings instead of refusing")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.preset not in presets:
        parser.error(f"unknown preset {args.preset!r}; choose from {', '.join(presets)}")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    known = [*parts, *optional, *(p for group in optional for p in units.PART_GROUPS.get(group, ()))]
    unknown = [p for p in args.parts if p not in known]
    if unknown or not args.parts:
        parser.error(f"unknown part {','.join(unknown) or '(none)'}; choose from {','.join(known)}")
    args.parts = [name for p in args.parts for name in units.PART_GROUPS.get(p, (p,))]
    if args.runs is not None and not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be between 1 and {MAX_RUNS}, got {args.runs}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be a non-negative integer below 2**63, got {args.seed}")
    args.dtype = args.dtype or presets[args.preset]["dtype"]
    if args.dtype not in ("complex64", "complex128"):
        parser.error(f"unknown dtype {args.dtype!r}; choose complex64 or complex128")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is an existing file, not a folder")
    if not 1 <= args.jobs <= MAX_JOBS:
        parser.error(f"--jobs must be between 1 and {MAX_JOBS}, got {args.jobs}")
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    try:
        models.Device(**device_settings(presets[args.preset].get("device", {}), args))
    except ValueError as err:
        parser.error(str(err))
    if args.ray not in (None, "local"):
        problem = ray_head_problem(args.ray)
        if problem:
            parser.error(f"no Ray cluster at {args.ray}: {problem}")
    return args


def ray_head_problem(address, timeout=5.0):
    """Why ``host:port`` is not a Ray head, or None when it may be one: the port must accept a TCP connection and
    speak HTTP/2 (Ray's GCS and client servers are gRPC). The common mistake, the dashboard's port, speaks
    HTTP/1.1 and is caught here at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(HTTP2_PREFACE)
            frame = conn.recv(9)
    except ValueError:
        return "the address must be host:port"
    except OSError as err:
        return f"cannot connect ({err.strerror or err})"
    if len(frame) < 9 or frame[3] != 4:  # an HTTP/2 server's first frame is SETTINGS (type 4)
        return "something listens there, but it is not a Ray head (the dashboard's port? use the GCS port, 6379)"
    return None


def device_settings(preset_device, args):
    """The preset's device table (none: the exact statevector) with --noise, --shots and --shot-grad applied."""
    given = {"noise": args.noise, "shots": args.shots, "shot_grad": args.shot_grad}
    return preset_device | {k: v for k, v in given.items() if v is not None}


def settings_for(args, presets, **extra):
    """The full settings of a run: the preset's table with the command line's overrides applied."""
    settings = copy.deepcopy(presets[args.preset])
    if args.runs is not None:
        settings["runs"] = args.runs
    settings.update(preset=args.preset, seed=args.seed, dtype=args.dtype,
                    fidelity=fidelity.FIDELITIES[args.fidelity].as_dict(),
                    device=device_settings(settings.get("device", {}), args),
                    export_circuits=args.export_circuits or settings.get("export_circuits", False), **extra)
    return settings


# ------------------------------------------------------------------------------------- process
def boot(dtype, devices=None):
    """Process-wide settings of a run (the driver's and each Ray worker's): glibc keeps freed memory, BLAS runs on
    one thread, compiled programs are cached on disk, the precision, and the devices the run axis is split over;
    returns their count."""
    models.keep_freed_memory()
    models.one_blas_thread()
    models.cache_compilations()
    models.set_precision(dtype)
    return models.use_devices(devices)


def device_description():
    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', device)} x {jax.local_device_count()}"


def start_ray(address):
    """Connect to the Ray cluster at ``address`` or start a local instance on loopback (``"local"``); a cluster
    that does not answer within ``RAY_CONNECT_S`` is one line and exit 2."""
    if address == "local":  # Ray's single-machine mode (its default on macOS): every server on 127.0.0.1
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray  # optional: only --ray needs it

    root = str(Path(__file__).resolve().parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                        **{k: v for k, v in os.environ.items() if k in ("QMU_CACHE", "MNIST_PATH", "XLA_FLAGS")}}}
    if address == "local":
        ray.init(runtime_env=env, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        return ray
    outcome = {}

    def connect():
        try:
            ray.init(address=address, runtime_env=env | {"working_dir": root, "excludes": ["results", ".cache"]},
                     logging_level="ERROR")
            outcome["ok"] = True
        except Exception as err:  # noqa: BLE001 - any failure to connect is reported in one line
            outcome["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(RAY_CONNECT_S)
    if not outcome.get("ok"):
        sys.stderr.write(f"error: cannot reach a Ray cluster at {address}: "
                         f"{outcome.get('error', f'no answer within {RAY_CONNECT_S:.0f} s')}\n")
        sys.stderr.flush()
        os._exit(2)  # Ray's client threads may still be retrying; nothing has been written
    return ray


# ---------------------------------------------------------------------------------- execution
_WORKER = {}  # a Ray worker's contexts, by settings: teachers and data are made once per worker


def _on_worker(settings, load, study_data, part, key, devices, fail_once_dir):
    """A Ray task: rebuild the context (cached per worker process) and run the unit of ``part`` keyed ``key``."""
    if fail_once_dir:  # fault injection for the retry test: the first attempt of every unit kills its worker
        marker = Path(fail_once_dir) / "_".join((part, *units.PARTS[part].unit_key(key)))
        if not marker.exists():
            marker.touch()
            os._exit(1)
    cache_key = json.dumps(settings, sort_keys=True)
    if cache_key not in _WORKER:
        boot(settings["dtype"], devices)
        _WORKER.clear()
        _WORKER[cache_key] = units.Context(settings, load, study_data)
    ctx = _WORKER[cache_key]
    unit = units.find_unit(ctx, part, key)
    start = time.perf_counter()
    return units.run_unit(ctx, unit), time.perf_counter() - start


class PartProgress:
    """The bookkeeping of one part in a run: its table, its pending units, how many are still out, and when its
    first unit started and its last ended."""

    def __init__(self, out, part, ctx):
        self.part, self.spec = part, units.PARTS[part]
        self.table = results.Table(out, self.spec)
        done = self.table.done()
        self.pending = [u for u in self.spec.build_units(ctx) if self.spec.unit_key(u.key) not in done]
        self.left, self.started, self.ended = len(self.pending), None, None

    def wall_s(self):
        return 0.0 if self.started is None else self.ended - self.started

    def record(self, out, unit, finished, seconds, config):
        """Save what a finished unit made: its arrays and files first (finished rows imply them), then its rows."""
        for name, arrays in finished.arrays.items():
            results.save_arrays(Path(out) / name, arrays)
        for name, text in finished.files.items():
            results.write_text(Path(out) / name, text)
        self.table.append(finished.rows)
        self.left -= 1
        self.ended = time.perf_counter()
        tqdm.write(f"[{self.part}] {unit.label}: {finished.info} ({seconds:.1f} s)")
        config.setdefault("unit_wall_s", {})[f"{self.part}: {unit.label}"] = round(seconds, 2)
        config.setdefault("method_s", {}).update(finished.timings)


def run_units(out, parts, ctx, config, *, ray=None, devices=None, jobs=1):
    """``(part, path of its CSV)`` of each part once its units and those of every earlier part are in.

    The pending units of all parts form one queue, ``jobs`` at a time in this process or as Ray tasks: a worker
    that a part no longer needs starts the next part's units, so no core waits while a part's longest unit ends.
    The driver appends each unit's rows. ``wall_s`` of a part: from its first unit's start to its last unit's end
    (parts overlap, so these add up to more than the run)."""
    progress = {part: PartProgress(out, part, ctx) for part in parts}
    todo = [(part, unit) for part in parts for unit in progress[part].pending]
    order = iter(parts)
    next_part = next(order, None)

    def started(part):
        progress[part].started = progress[part].started or time.perf_counter()

    def finished_parts():
        nonlocal next_part
        while next_part is not None and progress[next_part].left == 0:
            run = progress[next_part]
            config["wall_s"][next_part] = round(config["wall_s"].get(next_part, 0) + run.wall_s(), 2)
            yield next_part, run.table.path
            next_part = next(order, None)

    with tqdm(total=len(todo), desc="units", unit="unit") as bar:
        yield from finished_parts()
        for (part, unit), (finished, seconds) in _results(ctx, todo, ray, devices, jobs, started):
            progress[part].record(out, unit, finished, seconds, config)
            bar.update()
            yield from finished_parts()


def _results(ctx, todo, ray, devices, jobs, started):
    """((part, unit), (Done, seconds)) of each queued unit as it finishes: ``jobs`` at a time in this process, or
    as Ray tasks. ``started(part)`` is called as a unit of ``part`` starts (on submission, with Ray)."""
    if ray is None:
        def work(item):
            started(item[0])
            return timed(units.run_unit, ctx, item[1])

        yield from in_threads(work, todo, jobs)
        return
    task = ray.remote(max_retries=3)(_on_worker)
    refs = {}
    for part, unit in todo:
        started(part)
        refs[task.remote(ctx.settings, ctx.load, ctx.study_data, part, unit.key, devices,
                         os.environ.get("QMU_FAIL_ONCE_DIR"))] = (part, unit)
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        item = refs.pop(ready[0])
        yield item, ray.get(ready[0])


def timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def in_threads(fn, items, jobs):
    """``(item, fn(item))`` for each of ``items`` as it finishes, ``jobs`` at a time on daemon threads: while one
    compiles (XLA holds no Python lock then) another runs, and a unit's host work overlaps another's programs. An
    exception in ``fn`` is raised here, after which no new item starts."""
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for item in items:
        todo.put(item)

    def worker():
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, fn(item), None))
            except BaseException as err:  # noqa: BLE001 - handed to the driver, which raises it
                done.put((item, None, err))

    for _ in range(min(jobs, len(items))):
        threading.Thread(target=worker, name=UNIT_THREAD, daemon=True).start()
    try:
        for _ in items:
            item, result, err = done.get()
            if err is not None:
                raise err
            yield item, result
    finally:
        stop.set()


def run_script(main):
    """A run script's entry point: ``main()``. Should it end (Ctrl-C, say) while units still run on worker threads,
    the process leaves at once once its output is flushed (the rows are on disk, the folder's lock released): a
    thread returning from compiled code into a finalising interpreter aborts it ("FATAL: exception not
    rethrown")."""
    try:
        main()
    except SystemExit as stop:
        if any(t.name == UNIT_THREAD and t.is_alive() for t in threading.enumerate()):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code if isinstance(stop.code, int) else 1)
        raise


@contextlib.contextmanager
def interrupts_held():
    """A Ctrl-C (SIGINT) inside the block takes effect when it ends, so that a part's config.json and figures are
    written whole: one arriving inside matplotlib's compiled code would surface there as a TypeError, not as a
    KeyboardInterrupt. Outside the main thread (where no signal is handled) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # delivered now, to the handler the process had


def run_parts(out, parts, ctx, config, *, ray, devices, jobs, progress):
    """The units of every part (:func:`run_units`), then each part's config.json and figures, in the parts' order.
    ``progress['part']`` names the earliest part not yet written."""
    progress["part"] = parts[0] if parts else "setup"
    with contextlib.closing(run_units(out, parts, ctx, config, ray=ray, devices=devices, jobs=jobs)) as written:
        for part, csv_path in written:  # on Ctrl-C, closing it stops the workers from starting another unit
            progress["part"] = parts[min(parts.index(part) + 1, len(parts) - 1)]
            with interrupts_held():
                results.write_json(out / "config.json", config)
                figure = plots.save_part_figure(out, part, csv_path)
            print(f"[{part}] rows in {csv_path}" + (f", figure {figure}" if figure else ""))


def main(dataset, description, presets, load, parts, argv=None, extra=None, extra_settings=None, study_data=None,
         optional=()):
    """Run the ``parts`` of a study named on the command line into the results folder (``optional`` parts only
    when named)."""
    args = parse_args(description, presets, parts, argv, extra, optional)
    try:
        devices = boot(args.dtype, args.devices)
    except ValueError as err:
        fail(str(err))
    settings = settings_for(args, presets, dataset=dataset, **(extra_settings(args) if extra_settings else {}))
    if args.plan:
        print(plan.report(*plan.predict(units.Context(settings, load, study_data), args.parts)))
        return None
    out = Path(args.out or Path("results") / dataset)
    try:
        results.check_settings(out, settings, overwrite=args.overwrite)
    except results.ResultsError as err:
        fail(str(err))
    ray = start_ray(args.ray) if args.ray else None
    progress = {"part": "setup"}
    try:
        lock = results.lock(out)
        config = results.open_results(out, settings, files=[part.file for part in units.PARTS.values()],
                                      device=device_description(), overwrite=args.overwrite)
        config["execution"] = {"devices": devices, "jobs": None if ray else args.jobs, "ray": args.ray,
                               "ray_gcs": ray.get_runtime_context().gcs_address if ray else None}
        started = time.perf_counter()
        with lock:
            run_parts(out, args.parts, units.Context(settings, load, study_data), config, ray=ray,
                      devices=args.devices, jobs=args.jobs, progress=progress)
    except results.ResultsError as err:
        fail(str(err))
    except KeyboardInterrupt:
        saved = results.units_saved(out, [units.PARTS[p] for p in args.parts])
        fail(f"interrupted in part {progress['part']}; {saved} finished units are saved in {out}/; the same command "
             "resumes", status=130)
    except OSError as err:
        if not results.is_disk_full(err):
            raise
        fail(f"no space left on the device of {out}/: free at least {results.space_needed(out) / 2**20:.1f} MB "
             f"there; rows written so far are intact and the same command resumes", status=1)
    finally:
        if ray is not None:
            ray.shutdown()
    print(f"done in {time.perf_counter() - started:.0f} s; results in {out}/")
    return out
