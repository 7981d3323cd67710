"""MNIST 1 vs 9 study: resilience sweeps, unlearning, sweeps, the unlearning audit and the Hessian analysis.

    python run_unlearn_mnist.py                       # quick preset (minutes on a laptop CPU)
    python run_unlearn_mnist.py --preset paper        # the paper's settings (use a GPU)
    python run_unlearn_mnist.py --fidelity corrected  # our repaired definitions instead of the authors'
    python run_unlearn_mnist.py --parts phase --runs 3 --out results/mnist_phase

Writes phase.csv, unlearn.csv, sweep.csv, audit.csv, hessian.csv (+ hessian_spectra.npz), config.json and
figures/ into --out (default results/mnist/). A rerun with the same settings resumes.
"""

import datar
import fidelity
import poison_unlearn
import runner
from presets import ALPHAS, BOTH, DROP, PAPER_LAYER, QUICK_LAYER, SMOKE_LAYER, merged, schedule

PAPER = {  # the authors' src/run_unlearn_mnist.py and plot_hessian.ipynb
    **PAPER_LAYER, "num_train": 500, "gauge": "none",
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": {
        "qnn": {"model": "qnn", "arch": "depth6", "schedule": schedule(100, 256, 0.005)},
        "mlp": {"model": "mlp", "arch": "64-16", "schedule": schedule(100, 256, 0.005)},
        "mlp small": {"model": "mlp", "arch": "16-4", "schedule": schedule(100, 256, 0.005)}}},
    "unlearn": {"studies": {
        "mlp": {"model": "mlp", "arch": "16-4", "poison": "label_flip", "alpha": 0.3,
                "teacher": schedule(100, 128, 0.01), "unlearn": schedule(50, None, 0.001)},
        "qnn": {"model": "qnn", "arch": "depth6", "poison": "label_flip", "alpha": 0.3,
                "teacher": schedule(100, 256, 0.005), "unlearn": schedule(50, 256, 0.005)}}},
    "hessian": {"num_train": 500, "held_out": 0.3, "samples": 100, "alphas": [0.0, 0.2, 0.3, 0.4],
                "seeds": [0, 42, 123, 1024, 2048], "schedule": schedule(50, 32, 0.01),
                "models": {"mlp": {"model": "mlp", "arch": "8-2"},  # a model's own schedule overrides the study's
                           "qnn": {"model": "qnn", "arch": "depth5-cnot", "schedule": schedule(50, 32, 0.01)}},
                "lanczos_steps": 80, "probes": 100},
}

QUICK = merged(PAPER, QUICK_LAYER, {  # minutes on a 2-core CPU, still showing the paper's findings
    "phase": {"models": {"qnn": {"schedule": schedule(30, 64, 0.005)}}},
    "unlearn": {"studies": {"qnn": {"teacher": schedule(30, 64, 0.005), "unlearn": schedule(10, 64, 0.01)}}},
    "hessian": {"samples": 50, "seeds": [0, 123], "lanczos_steps": 40, "probes": 30,
                "models": {"qnn": {"schedule": schedule(20, 32, 0.01)}}},
})

SMOKE = merged(QUICK, SMOKE_LAYER, {  # seconds, for CI and the notebooks' self-check: plumbing, not findings
    "num_train": 100,
    "phase": {"alphas": [0.0, 0.5], "models": {
        "qnn": {"arch": "depth2", "schedule": schedule(2, 50, 0.05)}, "mlp": DROP,
        "mlp small": {"schedule": schedule(5, 50, 0.01)}}},
    "unlearn": {"studies": {  # unequal epochs: the notebooks' "final epoch" must be taken per study
        "mlp": {"teacher": schedule(5, 50, 0.01), "unlearn": schedule(3, None, 0.001)},
        "qnn": {"arch": "depth2", "teacher": schedule(2, 50, 0.05), "unlearn": schedule(2, None, 0.01)}}},
    "hessian": {"num_train": 100, "samples": 20, "alphas": [0.0, 0.3], "seeds": [0], "schedule": schedule(2, 32, 0.01),
                "models": {"mlp": {"arch": "4-2"}, "qnn": {"arch": "depth2-cnot", "schedule": DROP}},
                "lanczos_steps": 10, "probes": 5},
})

PRESETS = {"quick": QUICK, "paper": PAPER, "smoke": SMOKE}
PARTS = ["phase", "unlearn", "audit", "sweep", "hessian"]


def load(settings, gauge):
    """The clean MNIST 1-vs-9 dataset of these settings (the gauge is meaningless here)."""
    fid = fidelity.Fidelity(**settings["fidelity"])
    xs, ys, xs_val, ys_val = datar.mnist_data(settings["num_train"], seed=settings["seed"],
                                              encoding=fid.mnist_encoding, selection=fid.mnist_selection)
    return poison_unlearn.Dataset("mnist", "none", xs, ys, xs_val, ys_val, raw_dim=784)


def main(argv=None):
    try:  # a MNIST_PATH naming no file is bad input: one line, before anything is written
        datar.keras_mnist_path()
    except FileNotFoundError as err:
        runner.fail(str(err))
    return runner.main("mnist", __doc__, PRESETS, load, PARTS, argv)


if __name__ == "__main__":
    main()
