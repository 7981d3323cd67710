"""XXZ spin-chain study (ground states on --qubits spins): resilience sweeps, unlearning, weight sweeps.

    python run_unlearn_xxz.py                         # quick preset (about ten minutes on a laptop CPU)
    python run_unlearn_xxz.py --preset paper          # the paper's settings, 12 spins (use a GPU)
    python run_unlearn_xxz.py --parts phase --qubits 8

Writes phase.csv, unlearn.csv, sweep.csv, config.json and figures/ into --out (default
results/xxz/). The ground states are generated once by exact diagonalisation and cached.
"""

import datar
import poison_unlearn
import runner

ALPHAS = [round(0.1 * k, 1) for k in range(10)]
BOTH = ["label_flip", "feature_randomization"]
MLP_SCHEDULE = [400, 32, 0.01]

# schedules are [epochs, batch (null = whole set), learning rate]; gauge "random" = the paper's data
PAPER = {
    "qubits": 12, "runs": 5, "gauge": "random",
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth4", "schedule": [200, 32, 0.03]},
        {"model": "mlp", "arch": "64-16", "schedule": MLP_SCHEDULE},
        {"model": "mlp", "arch": "64-16", "gauge": "fixed", "schedule": MLP_SCHEDULE},
        *({"model": "mlp", "arch": arch, "poisons": ["label_flip"], "schedule": MLP_SCHEDULE}
          for arch in ("32-8", "16-4", "8-2", "8-4"))]},
    "unlearn": {"studies": [
        {"model": "mlp", "arch": "64-16", "poison": "label_flip", "alpha": 0.3,
         "teacher": MLP_SCHEDULE, "unlearn": [50, None, 0.01]},
        {"model": "qnn", "arch": "depth4", "poison": "label_flip", "alpha": 0.3,
         "teacher": [200, 32, 0.03], "unlearn": [50, None, 0.005]},
        {"model": "mlp", "arch": "64-16", "poison": "feature_randomization", "alpha": 0.8,
         "teacher": MLP_SCHEDULE, "unlearn": [50, None, 0.01]}]},
    "sweep": {"kl_w": ALPHAS, "fo_w": ALPHAS},
}

QUICK = {
    **PAPER, "runs": 2,
    "phase": {"alphas": ALPHAS, "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth4", "schedule": [60, 32, 0.03]},
        {"model": "mlp", "arch": "64-16", "schedule": [200, 32, 0.01]},
        {"model": "mlp", "arch": "64-16", "gauge": "fixed", "schedule": [200, 32, 0.01]},
        *({"model": "mlp", "arch": arch, "poisons": ["label_flip"], "schedule": [200, 32, 0.01]}
          for arch in ("16-4", "8-2"))]},
    "unlearn": {"studies": [
        {"model": "mlp", "arch": "64-16", "poison": "label_flip", "alpha": 0.3,
         "teacher": [200, 32, 0.01], "unlearn": [30, None, 0.01]},
        {"model": "qnn", "arch": "depth4", "poison": "label_flip", "alpha": 0.3,
         "teacher": [60, 32, 0.03], "unlearn": [30, None, 0.005]},
        {"model": "mlp", "arch": "64-16", "poison": "feature_randomization", "alpha": 0.8,
         "teacher": [200, 32, 0.01], "unlearn": [30, None, 0.01]}]},
    "sweep": {"kl_w": [0.0, 0.3, 0.6, 0.9], "fo_w": [0.0, 0.3, 0.6, 0.9]},
}

SMOKE = {  # seconds, for CI and the notebooks' self-check: shapes and plumbing, not findings
    **QUICK, "qubits": 6,
    "phase": {"alphas": [0.0, 0.5], "poisons": BOTH, "models": [
        {"model": "qnn", "arch": "depth2", "schedule": [3, 32, 0.03]},
        {"model": "mlp", "arch": "16-4", "schedule": [5, 32, 0.01]},
        {"model": "mlp", "arch": "16-4", "gauge": "fixed", "schedule": [5, 32, 0.01]}]},
    "unlearn": {"studies": [
        {"model": "mlp", "arch": "16-4", "poison": "label_flip", "alpha": 0.3,
         "teacher": [5, 32, 0.01], "unlearn": [3, None, 0.01]},
        {"model": "qnn", "arch": "depth2", "poison": "label_flip", "alpha": 0.3,
         "teacher": [3, 32, 0.03], "unlearn": [3, None, 0.005]}]},
    "sweep": {"kl_w": [0.0, 0.5], "fo_w": [0.0, 0.5]},
}

PRESETS = {"quick": QUICK, "paper": PAPER, "smoke": SMOKE}
PARTS = ["phase", "unlearn", "sweep"]
QUBITS = list(range(4, 17, 2))


def load(settings, gauge):
    """Ground states of the XXZ chain on ``settings['qubits']`` spins in the given phase gauge."""
    xs, ys, xs_val, ys_val = datar.xxz_data(settings["qubits"], seed=settings["seed"], gauge=gauge)
    print(f"XXZ: {settings['qubits']} spins, gauge {gauge} ({len(ys)} train, {len(ys_val)} validation states)")
    return poison_unlearn.Dataset("xxz", gauge, xs, ys, xs_val, ys_val)


QUBITS_FLAG = {"--qubits": {"type": int, "choices": QUBITS, "metavar": "L",
                             "help": "spins of the chain, even, 4 to 16 (default: the preset's, 12)"}}


def qubits_setting(args):
    return {"qubits": args.qubits} if args.qubits is not None else {}


def main(argv=None):
    return runner.main("xxz", __doc__, PRESETS, load, PARTS, argv, QUBITS_FLAG, qubits_setting)


if __name__ == "__main__":
    main()
