"""Settings algebra: a preset is the paper's table plus a few overrides, and the layers both studies share.

    QUICK = merged(PAPER, QUICK_LAYER, {"phase": {...}})  # the paper table, the shared quick layer, then this study's

``merged`` refuses a key the base table lacks, so a misspelt override is an error, not a setting silently ignored.
"""

import copy

import methods

ALPHAS = [round(0.1 * k, 1) for k in range(10)]
BOTH = ["label_flip", "feature_randomization"]


def schedule(epochs, batch, lr):
    """A training schedule as a preset field: epochs, minibatch size (None = the whole set), learning rate."""
    return {"epochs": epochs, "batch": batch, "lr": lr}


DROP = object()  # in a preset's overrides: remove this entry


def merged(base, *layers):
    """A copy of the table ``base`` with each of ``layers`` applied in turn: nested dicts merge, other values
    replace, and ``DROP`` removes an entry. A key that the table lacks is a ``KeyError`` naming its path."""
    out = copy.deepcopy(base)
    for layer in layers:
        out = _apply(out, layer, path=())
    return out


def _apply(table, changes, *, path):
    """A new dict: ``table`` with ``changes`` (never modified in place: a preset may share one entry in places)."""
    out = dict(table)
    for key, value in changes.items():
        if key not in out:
            raise KeyError(f"preset override {'.'.join(map(str, (*path, key)))!r}: the base table has no such key")
        if value is DROP:
            del out[key]
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _apply(out[key], value, path=(*path, key))
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- on a device (issue 22)
NOISES, SHOTS = ["none", "device", "device10"], [None, 1000, 100]  # models.NOISE_PROFILES; None: exact


def grid(noises, shots):
    """Device-grid points: every (noise, shots) pair."""
    return [{"noise": noise, "shots": count} for noise in noises for count in shots]


DEVICE_GRID = {  # the device part: the QNN's label-flip sweep and its unlearning study at every point of the grid,
    # the audit (membership inference, U-LiRA) of retrain and finetune at every shot count without gate noise
    "alphas": ALPHAS, "phase_model": "qnn", "study": "qnn", "points": grid(NOISES, SHOTS),
    "audit_points": grid(["none"], SHOTS), "audit_methods": ["retrain", "finetune"]}


# --------------------------------------------------------------------------- layers both studies share
PAPER_LAYER = {  # the authors' grids and our audit at full size
    "runs": 5, "dtype": "complex128", "methods": list(methods.METHODS),
    "sweep": {"kl_w": ALPHAS, "fo_w": ALPHAS, "hparam_points": 10, "lr_factors": [0.1, 0.316, 1.0, 3.16, 10.0]},
    "audit": {"shadows": 128, "folds": 4, "relearn_epochs": 50},
    "runs_per_program": "all",  # every unit's runs as one vmapped program (accelerators); see units.CHUNKS
    "device": {"noise": "none", "shots": None, "shot_grad": "surrogate", "trajectories": 8},  # models.Device
    "device_grid": DEVICE_GRID,
    "export_circuits": False,  # --export-circuits: the QNN teachers of the unlearn part as OpenQASM
}

QUICK_LAYER = {  # minutes on a 2-core CPU, still showing the paper's findings
    "dtype": "complex64", "runs": 2,
    "sweep": {"kl_w": [0.0, 0.2, 0.8], "fo_w": [0.0, 0.2, 0.8], "hparam_points": 3,  # x 2 runs = 6 cells, as the audit
              "lr_factors": [0.316, 1.0, 3.16]},
    "audit": {"shadows": 6, "relearn_epochs": 5},
    "runs_per_program": "runs",  # --runs at a time: parts share compilations, and CPUs run narrow programs faster
    "device": {"trajectories": 2},
    "device_grid": {"alphas": [0.0, 0.2, 0.3, 0.4, 0.5],  # shots at the exact device, noise at 1000 shots
                    "points": grid(["none"], SHOTS) + grid(["device", "device10"], [1000])},
}

SMOKE_LAYER = {  # seconds, for CI and the notebooks' self-check: shapes and plumbing, not findings
    "methods": [*methods.PAPER_METHODS, "salun", "newton"],  # every code path: masks and one-shot steps
    "sweep": {"kl_w": [0.0, 0.5], "fo_w": [0.0, 0.5], "hparam_points": 2, "lr_factors": [1.0, 3.0]},
    "audit": {"shadows": 4, "relearn_epochs": 3},
    "device_grid": {"alphas": [0.0, 0.5], "points": grid(["none"], [None]) + grid(["device10"], [100]),
                    "audit_points": grid(["none"], [100])},
}


# --------------------------------------------------------------------------- the controls of issue 21
CV = {  # cross-validation on the poisoned training set: folds and the grids it chooses from
    "folds": 5, "ridge": [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0], "k": [1, 3, 5, 9, 15, 25, 45],
    "C": [0.01, 0.1, 1.0, 10.0, 100.0], "weight_decay": [0.01, 0.1, 1.0], "label_smooth": [0.1, 0.2, 0.4],
    "gce": [0.4, 0.7, 1.0], "stop_epochs": [5, 10, 20, 50],
    "defaults": {"weight_decay": 0.1, "label_smooth": 0.1, "gce": 0.7},  # each defence's standalone strength
}
QUICK_CV = {"folds": 3, "ridge": [1e-3, 0.1, 10.0], "k": [1, 5, 15, 45], "C": [0.01, 1.0, 100.0],
            "weight_decay": [], "label_smooth": [], "gce": [], "stop_epochs": [10, 30]}  # the defaults still compete


def controls_table(*, qnn_arch, qnn, mlp, observable, deep, alphas, n_train, mlp_arch="64-16"):
    """The controls of a study: the MLP's defences, the observables, the kernel, neighbours and linear baselines,
    and the QNN's ablations (``deep``: the depth of the deep one). The costliest two, the unitary observable and
    the deep QNN, are explicitly on ``alphas``, so that a preset can run them on fewer. ``fit`` names how each is fitted (``controls.FITS``); ``match``: the QNN whose parameter count
    the linear model gets."""
    return {
        "mlp defences": {"model": "mlp", "arch": mlp_arch, "recipe": "defences", "fit": "defences", "schedule": mlp},
        "meandiff": {"model": "observable", "arch": "meandiff", "recipe": "closed_form", "fit": "sklearn"},
        "diagonal": {"model": "observable", "arch": "diagonal", "recipe": "plain", "fit": "trained",
                     "schedule": observable},
        "unitary": {"model": "observable", "arch": "unitary", "recipe": "plain", "fit": "trained",
                    "schedule": observable, "alphas": alphas},
        "kernel ridge": {"model": "kernel", "arch": "ridge", "recipe": "tuned", "fit": "sklearn"},
        "knn k1": {"model": "knn", "arch": "k1", "recipe": "plain", "fit": "sklearn"},
        "knn tuned": {"model": "knn", "arch": "tuned", "recipe": "tuned", "fit": "sklearn"},
        "linear": {"model": "linear", "arch": "pca", "recipe": "tuned", "fit": "sklearn", "match": qnn_arch},
        "qnn noent": {"model": "qnn", "arch": f"{qnn_arch}-noent", "recipe": "plain", "fit": "trained", "schedule": qnn},
        "qnn scale20": {"model": "qnn", "arch": f"{qnn_arch}-scale20", "recipe": "plain", "fit": "trained",
                        "schedule": qnn},
        "qnn deep": {"model": "qnn", "arch": f"depth{deep}", "recipe": "plain", "fit": "trained", "schedule": qnn,
                     "alphas": alphas},
    }


def memorise_table(*, qnn_arch, qnn, mlp, observable, deep, alphas, n_train, mlp_arch="64-16"):
    """The models of the random-label test: the QNN and its deep ablation (explicitly on ``n_train``, so that a
    preset can run it on fewer), the unitary observable, the MLP."""
    return {"qnn": {"model": "qnn", "arch": qnn_arch, "recipe": "plain", "schedule": qnn},
            "qnn deep": {"model": "qnn", "arch": f"depth{deep}", "recipe": "plain", "schedule": qnn,
                         "n_train": n_train},
            "unitary": {"model": "observable", "arch": "unitary", "recipe": "plain", "schedule": observable},
            "mlp": {"model": "mlp", "arch": mlp_arch, "recipe": "plain", "schedule": mlp}}
