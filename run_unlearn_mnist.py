"""MNIST 1 vs 9 study: resilience sweeps, unlearning, weight sweeps and the Hessian analysis.

    python run_unlearn_mnist.py                       # quick preset (about ten minutes on a laptop CPU)
    python run_unlearn_mnist.py --preset paper        # the paper's settings (use a GPU)
    python run_unlearn_mnist.py --parts phase --runs 3 --out results/mnist_phase

Writes phase.csv, unlearn.csv, sweep.csv, hessian.csv (+ hessian_spectra.npz), config.json and
figures/ into --out (default results/mnist/). A rerun with the same settings resumes.
"""

import datar
import poison_unlearn
import runner

ALPHAS = [round(0.1 * k, 1) for k in range(10)]
GRID = ALPHAS
BOTH = ["label_flip", "feature_randomization"]

# schedules are [epochs, batch (null = whole set), learning rate]
PAPER = {
    "num_train": 500, "runs": 5, "gauge": "none",
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth6", "schedule": [100, 256, 0.005]},
        {"model": "mlp", "arch": "64-16", "schedule": [100, 256, 0.005]},
        {"model": "mlp", "arch": "16-4", "schedule": [100, 256, 0.005]}]},
    "unlearn": {"studies": [
        {"model": "mlp", "arch": "16-4", "poison": "label_flip", "alpha": 0.3,
         "teacher": [100, 128, 0.01], "unlearn": [50, None, 0.001]},
        {"model": "qnn", "arch": "depth6", "poison": "label_flip", "alpha": 0.3,
         "teacher": [100, 256, 0.005], "unlearn": [50, 256, 0.005]}]},
    "sweep": {"kl_w": GRID, "fo_w": GRID},
    "hessian": {"num_train": 500, "held_out": 0.3, "samples": 100, "alphas": [0.0, 0.2, 0.3, 0.4],
                "seeds": [0, 42, 123, 1024, 2048], "schedule": [50, 32, 0.01],
                "models": [{"model": "mlp", "arch": "8-2"}, {"model": "qnn", "arch": "depth5-cnot"}],
                "lanczos_steps": 80, "probes": 100},
}

QUICK = {
    **PAPER, "runs": 2,
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth6", "schedule": [15, 32, 0.02]},
        {"model": "mlp", "arch": "64-16", "schedule": [100, 256, 0.005]},
        {"model": "mlp", "arch": "16-4", "schedule": [100, 256, 0.005]}]},
    "unlearn": {"studies": [
        PAPER["unlearn"]["studies"][0],
        {"model": "qnn", "arch": "depth6", "poison": "label_flip", "alpha": 0.3,
         "teacher": [15, 32, 0.02], "unlearn": [15, 128, 0.01]}]},
    "sweep": {"kl_w": [0.0, 0.2, 0.8], "fo_w": [0.0, 0.2, 0.8]},
    "hessian": {**PAPER["hessian"], "seeds": [0, 123], "lanczos_steps": 40, "probes": 30,
                "models": [{"model": "mlp", "arch": "8-2"},
                           {"model": "qnn", "arch": "depth5-cnot", "schedule": [20, 32, 0.01]}]},
}

SMOKE = {  # seconds, for CI and the notebooks' self-check: shapes and plumbing, not findings
    **QUICK, "num_train": 100, "runs": 2,
    "phase": {"alphas": [0.0, 0.5], "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth2", "schedule": [2, 50, 0.05]},
        {"model": "mlp", "arch": "16-4", "schedule": [5, 50, 0.01]}]},
    "unlearn": {"studies": [
        {"model": "mlp", "arch": "16-4", "poison": "label_flip", "alpha": 0.3,
         "teacher": [5, 50, 0.01], "unlearn": [3, None, 0.001]},
        {"model": "qnn", "arch": "depth2", "poison": "label_flip", "alpha": 0.3,
         "teacher": [2, 50, 0.05], "unlearn": [3, None, 0.01]}]},
    "sweep": {"kl_w": [0.0, 0.5], "fo_w": [0.0, 0.5]},
    "hessian": {**PAPER["hessian"], "num_train": 100, "samples": 20, "alphas": [0.0, 0.3], "seeds": [0],
                "schedule": [2, 32, 0.01], "models": [{"model": "mlp", "arch": "4-2"},
                                                      {"model": "qnn", "arch": "depth2-cnot"}],
                "lanczos_steps": 10, "probes": 5},
}

PRESETS = {"quick": QUICK, "paper": PAPER, "smoke": SMOKE}
PARTS = ["phase", "unlearn", "sweep", "hessian"]


def load(settings, gauge):
    """The clean MNIST 1-vs-9 dataset of these settings (the gauge is meaningless here)."""
    xs, ys, xs_val, ys_val = datar.mnist_data(settings["num_train"], seed=settings["seed"])
    return poison_unlearn.Dataset("mnist", "none", xs, ys, xs_val, ys_val)


def main(argv=None):
    return runner.main("mnist", __doc__, PRESETS, load, PARTS, argv)


if __name__ == "__main__":
    main()
