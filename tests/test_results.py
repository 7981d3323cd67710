"""The results folder on fake units (milliseconds): resume, the settings guard, the lock, and faults in one line."""

import csv
import errno
import functools
import http.server
import subprocess
import sys
import threading

import pytest
from conftest import ROOT

import fidelity
import results
import runner
import units

PRESETS = {"quick": {"dtype": "complex64", "runs": 1, "runs_per_program": "runs", "units": 3}}


def fake_work(ctx, index, calls):
    calls.append(index)
    if ctx.settings.get("interrupt_at") == index:
        raise KeyboardInterrupt
    return units.Done([{"name": f"u{index}", "value": index * k, "pad": "x" * ctx.settings.get("pad", 0)}
                       for k in range(2)], f"unit {index}")


@pytest.fixture
def fake(monkeypatch):
    """A part "fake" of ``settings['units']`` units, two rows each; returns the list of unit indices run."""
    calls = []

    def build(ctx):
        return [units.Unit({"name": f"u{i}"}, f"unit {i}", functools.partial(fake_work, index=i, calls=calls))
                for i in range(ctx.settings["units"])]

    monkeypatch.setitem(units.PARTS, "fake", units.Part("fake.csv", ("name", "value", "pad"), ("name",), build))
    return calls


def run(out, *argv, presets=PRESETS):
    return runner.main("fake", "a fake study", presets, lambda settings, gauge: None, ["fake"],
                       ["--out", str(out), *argv])


def error_lines(capsys):
    """The lines a run printed on stderr that are not progress bars: one ``error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_rerun_resumes_with_the_pending_units_only(tmp_path, fake):
    full = rows(run(tmp_path / "a") / "fake.csv")
    assert full[0] == ["name", "value", "pad"] and len(full) == 1 + 3 * 2 and sorted(fake) == [0, 1, 2]
    cut = tmp_path / "b"
    run(cut)
    with open(cut / "fake.csv", "w", newline="") as f:  # as if interrupted after the first unit
        csv.writer(f).writerows(full[:3])
    fake.clear()
    run(cut)
    assert sorted(fake) == [1, 2] and sorted(rows(cut / "fake.csv")) == sorted(full)
    fake.clear()
    run(cut)
    assert fake == []


def test_a_part_starts_while_the_one_before_ends_and_the_parts_are_written_in_order(tmp_path, monkeypatch, capsys):
    """Unit 0 of part "slow" ends only once a unit of part "next" has run: one queue for all parts (a worker that
    "slow" no longer needs starts "next"), and "next" is written after "slow", as its figures may read it."""
    log, next_ran = [], threading.Event()

    def work(ctx, part, index):
        if (part, index) == ("slow", 0):
            assert next_ran.wait(20), "the next part never started"
        log.append((part, index))
        if part == "next":
            next_ran.set()
        return units.Done([{"name": f"{part}{index}", "value": index, "pad": ""}], part)

    for part, count in (("slow", 2), ("next", 1)):
        monkeypatch.setitem(units.PARTS, part, units.Part(f"{part}.csv", ("name", "value", "pad"), ("name",), (
            lambda ctx, part=part, count=count: [units.Unit({"name": f"{part}{i}"}, f"{part} {i}", functools.partial(
                work, part=part, index=i)) for i in range(count)])))
    out = runner.main("fake", "two fake parts", PRESETS, lambda settings, gauge: None, ["slow", "next"],
                      ["--out", str(tmp_path / "p"), "--jobs", "2"])
    assert log == [("slow", 1), ("next", 0), ("slow", 0)]
    written = [line.split("]")[0] for line in capsys.readouterr().out.splitlines() if "rows in" in line]
    assert written == ["[slow", "[next"] and len(rows(out / "slow.csv")) == 1 + 2


def test_other_settings_are_refused_unless_overwrite(tmp_path, fake, capsys):
    out = run(tmp_path / "c")
    before = rows(out / "fake.csv")
    config = (out / "config.json").read_text()
    for other in (["--seed", "5"], ["--fidelity", "corrected"]):
        with pytest.raises(SystemExit) as stop:
            run(out, *other)
        assert stop.value.code == 2 and "other settings" in capsys.readouterr().err
    assert rows(out / "fake.csv") == before and (out / "config.json").read_text() == config
    fake.clear()
    run(out, "--seed", "5", "--overwrite")
    assert sorted(fake) == [0, 1, 2] and '"seed": 5' in (out / "config.json").read_text()


def test_the_settings_guard_reads_only(tmp_path):
    settings = {"seed": 0, "fidelity": fidelity.PAPER.as_dict()}
    results.check_settings(tmp_path / "new", settings, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path, fake, capsys):
    out = tmp_path / "d"
    with results.lock(out):
        with pytest.raises(results.ResultsError, match=r"pid \d+"):
            results.lock(out)
        with pytest.raises(SystemExit) as stop:
            run(out)
    err = error_lines(capsys)
    assert stop.value.code == 2 and len(err) == 1 and str(out) in err[0] and "pid" in err[0]
    assert fake == [] and sorted(p.name for p in out.iterdir()) == [results.LOCK_NAME]
    run(out)  # released: the next run writes
    assert sorted(fake) == [0, 1, 2]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "e"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, results; held = results.lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(results.ResultsError, match=str(holder.pid)):
        results.lock(out)
    holder.kill()
    holder.wait()
    results.lock(out).close()


def test_ctrl_c_ends_in_one_line_and_the_same_command_resumes(tmp_path, fake, capsys):
    presets = {"quick": PRESETS["quick"] | {"interrupt_at": 1}}
    with pytest.raises(SystemExit) as stop:  # one unit at a time: with two, unit 2 may finish before 1 is seen
        run(tmp_path / "f", "--jobs", "1", presets=presets)
    err = error_lines(capsys)
    assert stop.value.code == 130 and len(err) == 1
    assert "interrupted in part fake" in err[0] and "1 finished units" in err[0] and "resumes" in err[0]
    assert len(rows(tmp_path / "f" / "fake.csv")) == 1 + 2


def fail_after(count, real):
    """``results.Table.append`` that runs out of disk after ``count`` appends."""
    done = []

    def append(table, new_rows):
        if len(done) >= count:
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(1)
        return real(table, new_rows)

    return append


def test_a_full_disk_ends_in_one_line_keeps_the_rows_and_a_rerun_resumes(tmp_path, fake, capsys, monkeypatch):
    out = tmp_path / "g"
    with monkeypatch.context() as full, pytest.raises(SystemExit) as stop:
        full.setattr(results.Table, "append", fail_after(1, results.Table.append))
        run(out)
    err = error_lines(capsys)
    assert stop.value.code == 1 and len(err) == 1 and str(out) in err[0] and "MB" in err[0]
    assert len(rows(out / "fake.csv")) == 1 + 2 and not list(out.glob("*.tmp"))
    fake.clear()
    run(out)
    assert sorted(fake) == [1, 2] and len(rows(out / "fake.csv")) == 1 + 3 * 2


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path, fake, capsys):
    """A 40 KB tmpfs as --out, where the machine lets us mount one (root): rows of 8 KB fill it."""
    out = tmp_path / "tmpfs"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full disk above covers the writer")
    try:
        presets = {"quick": PRESETS["quick"] | {"pad": 4000, "units": 6}}
        with pytest.raises(SystemExit) as stop:
            run(out, presets=presets)
        err = error_lines(capsys)
        assert stop.value.code == 1 and len(err) == 1 and "no space left" in err[0]
        kept = rows(out / "fake.csv")
        assert 1 < len(kept) < 1 + 6 * 2 and (len(kept) - 1) % 2 == 0  # whole units only
        subprocess.run(["mount", "-o", "remount,size=1m", str(out)], check=True)
        run(out, presets=presets)
        assert len(rows(out / "fake.csv")) == 1 + 6 * 2
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_disk_full_is_recognised_through_a_wrapping_exception():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("while saving a figure") from inner
    except RuntimeError as outer:
        assert results.is_disk_full(outer)
    assert not results.is_disk_full(OSError(errno.EACCES, "Permission denied"))


class NotRay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_service_that_is_not_ray_is_refused_before_anything_is_written(tmp_path, fake, capsys):
    """The common mistake: --ray at the dashboard's port, an HTTP/1.1 server (here one of ours, on loopback)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stop:
            run(tmp_path / "h", "--ray", f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    err = error_lines(capsys)
    assert stop.value.code == 2 and len(err) == 1 and "not a Ray head" in err[0]
    assert not (tmp_path / "h").exists() and fake == []
