"""Run scripts: argument errors, resume after an interruption, settings guard, determinism."""

import csv
import json

import pytest

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
                                  ["--devices", "64"], ["--ray", "127.0.0.1:9"]])
def test_bad_arguments_one_line_exit_2_nothing_written(argv, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_mnist("--out", str(out), *argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists()


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        run_mnist("--out", str(target), "--preset", "smoke", "--parts", "phase")
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]


def test_xxz_qubits_out_of_range(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_xxz("--qubits", "3", "--out", str(tmp_path / "x"))
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_resume_after_interruption_gives_the_same_rows(tmp_path):
    full = run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(tmp_path / "a"))
    rows = read_rows(full / "phase.csv")
    assert rows[0] == runner.TABLES["phase"][1]
    units = {tuple(r[:5]) for r in rows[1:]}
    assert len(rows) - 1 == len(units) * 2 * 2  # 2 alphas x 2 runs per unit
    # an interrupted run: only the first unit finished
    cut = tmp_path / "b"
    run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(cut))
    first = [r for r in rows if r[:5] == rows[1][:5]]
    with open(cut / "phase.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *first])
    run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(cut))
    assert sorted(read_rows(cut / "phase.csv")) == sorted(rows)
    assert (full / "figures" / "phase.png").exists() and (full / "config.json").exists()


def test_other_settings_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(out), "--runs", "1")
    before = read_rows(out / "phase.csv")
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["fidelity"]["name"] == "paper"  # the default: the authors' definitions
    assert config["settings"]["fidelity"]["mnist_encoding"] == "columns"
    for other in (["--seed", "5"], ["--fidelity", "corrected"]):
        with pytest.raises(SystemExit) as stop:
            run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(out), "--runs", "1", *other)
        assert stop.value.code == 2 and "other settings" in capsys.readouterr().err
    assert read_rows(out / "phase.csv") == before
    run_mnist("--preset", "smoke", "--parts", "phase", "--out", str(out), "--runs", "1", "--seed", "5", "--overwrite")
    assert read_rows(out / "phase.csv") != before
