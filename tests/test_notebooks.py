"""The three notebooks execute on small (smoke-preset) results and draw their figures."""

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

import run_unlearn_mnist as mnist_script
import run_unlearn_xxz as xxz_script


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    mnist_script.main(["--preset", "smoke", "--out", str(base / "mnist")])
    mnist_script.main(["--preset", "smoke", "--parts", "phase", "--fidelity", "corrected",
                       "--out", str(base / "mnist_corrected")])
    xxz_script.main(["--preset", "smoke", "--out", str(base / "xxz")])
    return base


@pytest.mark.parametrize("name,folder,figures", [("test_mnist.ipynb", "mnist", 10), ("test_xxz.ipynb", "xxz", 7),
                                                  ("heissian.ipynb", "mnist", 2)])
def test_notebook_executes_and_draws(name, folder, figures, smoke_results, monkeypatch):
    monkeypatch.setenv("QMU_RESULTS", str(smoke_results / folder))
    monkeypatch.setenv("QMU_PRESET", "smoke")
    monkeypatch.setenv("QMU_CORRECTED", str(smoke_results / f"{folder}_corrected"))  # mnist: both fidelities
    book = nbformat.read(ROOT / name, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= figures
