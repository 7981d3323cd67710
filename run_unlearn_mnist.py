"""MNIST 1 vs 9 study: resilience sweeps, unlearning, sweeps, the unlearning audit and the Hessian analysis.

    python run_unlearn_mnist.py                       # quick preset (minutes on a laptop CPU)
    python run_unlearn_mnist.py --preset paper        # the paper's settings (use a GPU)
    python run_unlearn_mnist.py --preset paper --plan # its size and predicted time here; writes nothing
    python run_unlearn_mnist.py --fidelity corrected  # our repaired definitions instead of the authors'
    python run_unlearn_mnist.py --parts phase --runs 3 --out results/mnist_phase

Writes phase.csv, controls.csv, memorise.csv, unlearn.csv, sweep.csv, audit.csv, hessian.csv (+ hessian_spectra.npz),
config.json and figures/ into --out (default results/mnist/). A rerun with the same settings resumes.
"""

import datar
import fidelity
import poison_unlearn
import runner
from presets import (ALPHAS, BOTH, CV, DROP, PAPER_LAYER, QUICK_CV, QUICK_LAYER, SMOKE_LAYER, controls_table,
                     memorise_table, merged, schedule)

QNN, MLP = schedule(100, 256, 0.005), schedule(100, 256, 0.005)
MEMORISE_N = [10, 20, 50, 100, 250, 500]
MODELS = {"qnn_arch": "depth6", "qnn": QNN, "mlp": MLP, "observable": QNN, "deep": 24, "alphas": ALPHAS,
          "n_train": MEMORISE_N}  # the controls and memorisation tables

PAPER = {  # the authors' src/run_unlearn_mnist.py and plot_hessian.ipynb
    **PAPER_LAYER, "num_train": 500, "gauge": "none",
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": {
        "qnn": {"model": "qnn", "arch": "depth6", "schedule": QNN},
        "mlp": {"model": "mlp", "arch": "64-16", "schedule": MLP},
        "mlp small": {"model": "mlp", "arch": "16-4", "schedule": MLP}}},
    "controls": {"alphas": ALPHAS, "poisons": BOTH, "cv": CV, "models": controls_table(**MODELS)},  # beyond the paper
    "memorise": {"n_train": MEMORISE_N, "factor": 10, "models": memorise_table(**MODELS)},
    "unlearn": {"studies": {
        "mlp": {"model": "mlp", "arch": "16-4", "poison": "label_flip", "alpha": 0.3,
                "teacher": schedule(100, 128, 0.01), "unlearn": schedule(50, None, 0.001)},
        "qnn": {"model": "qnn", "arch": "depth6", "poison": "label_flip", "alpha": 0.3,
                "teacher": schedule(100, 256, 0.005), "unlearn": schedule(50, 256, 0.005)},
        # beyond the paper: unlearning at matched memorisation (the MLP its defence picked by cross-validation; the
        # QNN's function class without its circuit)
        "mlp tuned": {"model": "mlp", "arch": "64-16", "recipe": "tuned", "poison": "label_flip", "alpha": 0.3,
                      "teacher": MLP, "unlearn": schedule(50, None, 0.001), "sweep": True},
        "unitary": {"model": "observable", "arch": "unitary", "poison": "label_flip", "alpha": 0.3,
                    "teacher": QNN, "unlearn": schedule(50, 256, 0.005), "sweep": True}}},
    "hessian": {"num_train": 500, "held_out": 0.3, "samples": 100, "alphas": [0.0, 0.2, 0.3, 0.4],
                "seeds": [0, 42, 123, 1024, 2048], "schedule": schedule(50, 32, 0.01),
                "models": {"mlp": {"model": "mlp", "arch": "8-2"},  # a model's own schedule overrides the study's
                           "qnn": {"model": "qnn", "arch": "depth5-cnot", "schedule": schedule(50, 32, 0.01)}},
                "lanczos_steps": 80, "probes": 100},
}

QUICK_QNN = schedule(30, 64, 0.005)
QUICK = merged(PAPER, QUICK_LAYER, {  # minutes on a 2-core CPU, still showing the paper's findings
    "phase": {"models": {"qnn": {"schedule": QUICK_QNN}}},
    "controls": {"alphas": [0.0, 0.2, 0.3, 0.4, 0.5], "poisons": ["label_flip"], "cv": QUICK_CV,
                 "models": {name: {"schedule": QUICK_QNN} for name in ("diagonal", "qnn noent", "qnn scale20")}
                 | {name: {"schedule": QUICK_QNN, "alphas": [0.0, 0.3, 0.5]} for name in ("unitary", "qnn deep")}},
    "memorise": {"factor": 2, "models": {"qnn": {"schedule": QUICK_QNN}, "unitary": {"schedule": QUICK_QNN},
                                         "qnn deep": {"schedule": QUICK_QNN, "n_train": [10, 20, 50]}}},
    "unlearn": {"studies": {"qnn": {"teacher": QUICK_QNN, "unlearn": schedule(10, 64, 0.01)},
                            # the unitary observable's study is the paper preset's: a step costs a 1024 x 512 Gram
                            # matrix, and Newton and Fisher forgetting on its 524,288 parameters take over 10 minutes
                            "mlp tuned": {"sweep": False}, "unitary": DROP}},
    "hessian": {"samples": 50, "seeds": [0, 123], "lanczos_steps": 40, "probes": 30,
                "models": {"qnn": {"schedule": schedule(20, 32, 0.01)}}},
})

SMOKE_QNN, SMOKE_MLP = schedule(2, 50, 0.05), schedule(5, 50, 0.01)
SMOKE = merged(QUICK, SMOKE_LAYER, {  # seconds, for CI and the notebooks' self-check: plumbing, not findings
    "num_train": 100,
    "phase": {"alphas": [0.0, 0.5], "models": {
        "qnn": {"arch": "depth2", "schedule": schedule(2, 50, 0.05)}, "mlp": DROP,
        "mlp small": {"schedule": schedule(5, 50, 0.01)}}},
    "unlearn": {"studies": {  # unequal epochs (the notebooks take each study's final epoch); the MLPs share programs
        "mlp": {"teacher": schedule(5, 50, 0.01), "unlearn": schedule(3, None, 0.001)},
        "qnn": {"arch": "depth2", "teacher": schedule(2, 50, 0.05), "unlearn": schedule(2, None, 0.01)},
        "mlp tuned": {"arch": "16-4", "teacher": SMOKE_MLP, "unlearn": schedule(3, None, 0.001)}}},
    "controls": {"alphas": [0.0, 0.5], "cv": {"folds": 2, "ridge": [0.1], "k": [1, 3], "C": [1.0], "stop_epochs": [2]},
                 "models": {"mlp defences": {"arch": "16-4", "schedule": SMOKE_MLP}, "diagonal": DROP,
                            "unitary": {"schedule": SMOKE_QNN}, "linear": {"match": "depth2"},
                            "qnn noent": {"arch": "depth2-noent", "schedule": SMOKE_QNN}, "qnn scale20": DROP,
                            "qnn deep": DROP}},  # one of each way of fitting
    "memorise": {"n_train": [10], "factor": 2, "models": {"qnn": {"arch": "depth2", "schedule": SMOKE_QNN},
                                                          "qnn deep": DROP, "unitary": DROP,
                                                          "mlp": {"arch": "16-4", "schedule": SMOKE_MLP}}},
    "hessian": {"num_train": 100, "samples": 20, "alphas": [0.0, 0.3], "seeds": [0], "schedule": schedule(2, 32, 0.01),
                "models": {"mlp": {"arch": "4-2"}, "qnn": {"arch": "depth2-cnot", "schedule": DROP}},
                "lanczos_steps": 10, "probes": 5},
})

PRESETS = {"quick": QUICK, "paper": PAPER, "smoke": SMOKE}
OPTIONAL = ["device"]  # not run by default: over the quick budget (see the README's "On a device")
# the order units are queued and parts written: the sweep's many small units last, so that they fill the cores while the
# longer units of earlier parts end (the Hessian study before them: a minute less of one idle core)
PARTS = ["phase", "controls", "memorise", "unlearn", "audit", "hessian", "sweep"]


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
    return runner.main("mnist", __doc__, PRESETS, load, PARTS, argv, optional=OPTIONAL)


if __name__ == "__main__":
    runner.run_script(main)
