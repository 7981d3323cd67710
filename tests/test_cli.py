"""Run scripts: argument errors, one writer per folder, Ctrl-C (resume and the settings guard: test_results)."""

import signal
import subprocess
import sys
import threading
import time

import pytest
import threadpoolctl
from conftest import ROOT

import results
import run_unlearn_mnist as mnist_script
import run_unlearn_xxz as xxz_script
import runner


def run_mnist(*argv):
    return mnist_script.main(list(argv))


def run_xxz(*argv):
    return xxz_script.main(list(argv))


@pytest.mark.parametrize("argv", [["--preset", "huge"], ["--parts", "phase,dance"], ["--runs", "0"],
                                  ["--runs", "100000000"], ["--dtype", "complex32"], ["--seed", "x"],
                                  ["--seed", "-1"], ["--fidelity", "loose"], ["--devices", "0"],
                                  ["--devices", "64"], ["--jobs", "0"], ["--jobs", "65"], ["--ray", "127.0.0.1:9"]])
def test_bad_arguments_one_line_exit_2_nothing_written(argv, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_mnist("--out", str(out), *argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists()


def test_a_run_process_runs_blas_on_one_thread():
    """boot, the process settings of every run (a Ray worker's too), leaves each BLAS that NumPy, SciPy and
    jaxlib's LAPACK kernels call on one thread: OpenBLAS's spinning threads otherwise take the cores from XLA's."""
    runner.boot("complex64")
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert any("scipy_openblas" in lib["filepath"] for lib in blas)
    assert [lib["num_threads"] for lib in blas] == [1] * len(blas)


def test_an_mnist_path_naming_no_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNIST_PATH", str(tmp_path / "missing.npz"))
    with pytest.raises(SystemExit) as stop:
        run_mnist("--out", str(tmp_path / "out"), "--preset", "smoke")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "missing.npz" in err[0]
    assert not (tmp_path / "out").exists()


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        run_mnist("--out", str(target), "--preset", "smoke", "--parts", "phase")
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]


def test_xxz_gauge_flag_sets_the_states_phase_and_is_recorded(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_xxz("--gauge", "wobbly", "--out", str(tmp_path / "bad"))
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    out = run_xxz("--preset", "smoke", "--parts", "phase", "--runs", "1", "--gauge", "sign", "--out", str(tmp_path / "s"))
    gauges = {(line.split(",")[2], line.split(",")[1]) for line in read_lines(out / "phase.csv")[1:]}
    assert ("qnn", "sign") in gauges and ("mlp", "fixed") in gauges  # the fixed-gauge MLP stays fixed
    assert '"gauge": "sign"' in (out / "config.json").read_text()


def test_xxz_qubits_out_of_range(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_xxz("--qubits", "3", "--out", str(tmp_path / "x"))
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def read_lines(path):
    return path.read_text().splitlines()


def test_two_runs_into_one_folder_one_writes_and_ctrl_c_ends_in_one_line(tmp_path, capsys):
    """Two smoke runs into one folder: the second (here in-process) exits 2 in one line while the first holds the
    folder; the first, interrupted by SIGINT after its first part, ends in one line with status 130; nothing is
    duplicated, and the same command resumes."""
    out = tmp_path / "shared"
    command = [sys.executable, "run_unlearn_mnist.py", "--preset", "smoke", "--parts", "phase,unlearn", "--out",
               str(out)]
    first = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             preexec_fn=default_sigint)
    try:
        wait_for(lambda: "pid" in read_text(out / results.LOCK_NAME))
        with pytest.raises(SystemExit) as stop:
            run_mnist("--preset", "smoke", "--parts", "phase,unlearn", "--out", str(out))
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and str(out) in err[0] and f"pid {first.pid}" in err[0]
        wait_for(lambda: (out / "figures" / "phase.pdf").exists())  # the phase part is done
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted in part" in stderr.strip().splitlines()[-1] and "resumes" in stderr
    phase = read_lines(out / "phase.csv")
    assert len(phase) == len(set(phase)) == 1 + 4 * 2 * 2  # 4 units x 2 alphas x 2 runs, once each
    run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(out))
    assert read_lines(out / "phase.csv") == phase  # resumed: nothing left to do in this part


def test_units_in_threads_come_back_as_each_finishes_and_a_fault_is_raised_in_the_driver():
    slow_first = runner.in_threads(lambda x: time.sleep(x / 10) or x * x, [5, 0, 1], jobs=2)
    assert list(slow_first) == [(0, 0), (1, 1), (5, 25)]  # not in submission order
    with pytest.raises(ZeroDivisionError):
        list(runner.in_threads(lambda x: 1 / x, [1, 0, 2], jobs=2))



def test_units_in_threads_share_a_precision_block_and_a_block_of_another_precision_waits_for_them():
    import models

    inside, both_in, seen = threading.Barrier(2, timeout=10), threading.Event(), []

    def unit(dtype):
        if dtype == "complex64":
            both_in.wait(10)
        with models.precision(dtype):
            if dtype == "complex128":
                inside.wait()  # both complex128 units are in their blocks at once (a lock would time out here)
                both_in.set()
                time.sleep(0.2)
            seen.append((dtype, str(models.complex_dtype())))

    try:
        done = [x for x, _ in runner.in_threads(unit, ["complex128", "complex128", "complex64"], jobs=3)]
    finally:
        models.set_precision("complex64")
    assert seen == [("complex128", "complex128")] * 2 + [("complex64", "complex64")]  # it waited for both to leave
    assert done[-1] == "complex64" and str(models.complex_dtype()) == "complex64"


def test_a_unit_runs_in_its_own_precision_or_the_runs():
    import types

    import models
    import units

    ctx = types.SimpleNamespace(settings={"dtype": "complex64"})
    seen = [units.run_unit(ctx, units.Unit({}, "u", lambda _: str(models.complex_dtype()), precision=p))
            for p in ("complex128", None)]
    assert seen == ["complex128", "complex64"] and str(models.complex_dtype()) == "complex64"


def test_a_ctrl_c_while_a_part_writes_its_figures_takes_effect_once_they_are_written():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even where the suite ignores it
    written = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with runner.interrupts_held():
                signal.raise_signal(signal.SIGINT)
                written.append("figures")
        assert written == ["figures"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def default_sigint():
    """In the child: SIGINT's default disposition, even when the suite was started with SIGINT ignored (a shell's
    background job), in which case Python would install no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_text(path):
    return path.read_text() if path.exists() else ""


def wait_for(condition, timeout=300):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)
