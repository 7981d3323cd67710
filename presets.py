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


# --------------------------------------------------------------------------- layers both studies share
PAPER_LAYER = {  # the authors' grids and our audit at full size
    "runs": 5, "dtype": "complex128", "methods": list(methods.METHODS),
    "sweep": {"kl_w": ALPHAS, "fo_w": ALPHAS, "hparam_points": 10, "lr_factors": [0.1, 0.316, 1.0, 3.16, 10.0]},
    "audit": {"shadows": 128, "folds": 4, "relearn_epochs": 50},
    "runs_per_program": "all",  # every unit's runs as one vmapped program (accelerators); see units.CHUNKS
}

QUICK_LAYER = {  # minutes on a 2-core CPU, still showing the paper's findings
    "dtype": "complex64", "runs": 2,
    "sweep": {"kl_w": [0.0, 0.2, 0.8], "fo_w": [0.0, 0.2, 0.8], "hparam_points": 3,  # x 2 runs = 6 cells, as the audit
              "lr_factors": [0.316, 1.0, 3.16]},
    "audit": {"shadows": 6, "relearn_epochs": 5},
    "runs_per_program": "runs",  # --runs at a time: parts share compilations, and CPUs run narrow programs faster
}

SMOKE_LAYER = {  # seconds, for CI and the notebooks' self-check: shapes and plumbing, not findings
    "methods": [*methods.PAPER_METHODS, "salun", "newton"],  # every code path: masks and one-shot steps
    "sweep": {"kl_w": [0.0, 0.5], "fo_w": [0.0, 0.5], "hparam_points": 2, "lr_factors": [1.0, 3.0]},
    "audit": {"shadows": 4, "relearn_epochs": 3},
}
