"""Is the resilience quantum? Classical and quantum controls on the phase part's poisoned sets.

Every control sees the same poisoned training sets as ``phase`` (``poison_unlearn.poisoned_copy``: the same draw for
every model) and is scored the same way: accuracy on the poisoned training set as trained, on the clean validation
set, and ``flip_fit``, the fraction of poisoned rows predicted with their poisoned label. Hyper-parameters are chosen
by cross-validation on the poisoned training set only (the user of a poisoned set has no clean labels); the folds of
a cell come from (seed, the cell's identity) and are shared by every control.

Controls (``FITS``): models the engine trains (``trained``: the QNN's ablations, the bounded observables), the
classical label-noise defences of the MLP (``defences``), the closed-form mean-difference observable
(``meandiff``), kernel ridge on the QNN's fidelity kernel, nearest neighbours in fidelity distance and logistic
regression on principal components (scikit-learn). ``memorise_unit`` measures how many random labels a model fits,
and ``operator_norm_barrier`` the smallest observable norm that fits a labelling.
"""

from dataclasses import asdict, replace
from typing import NamedTuple

import numpy as np
from sklearn.decomposition import PCA
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

import datar
import models
import poison_unlearn as pu

DEFENCES = tuple(models.DEFENCE_AUX)  # a strength each; early stopping is a choice of epoch


# ------------------------------------------------------------------------------------- kernels
def overlaps(a, b):
    """|<a_i|b_j>|^2 for rows of ``a`` and ``b`` (the QNN's feature-space kernel: its feature map is psi psi^dag)."""
    return np.abs(np.asarray(a) @ np.asarray(b).conj().T) ** 2


def fidelity_distance(a, b):
    """sqrt(1 - F) with F the fidelity of the *normalised* states (a distance also for unnormalised encodings)."""
    norms = np.outer(np.linalg.norm(a, axis=1) ** 2, np.linalg.norm(b, axis=1) ** 2)
    return np.sqrt(np.clip(1.0 - overlaps(a, b) / norms, 0.0, None))


def meandiff_scores(kernel, ys):
    """<psi|M_1 - M_0|psi> for each row of ``kernel`` (overlaps with the training states), M_c the mean density
    matrix of training class c: the sign is a classifier with no trained parameter."""
    ys = np.asarray(ys)
    return kernel[:, ys == 1].mean(axis=1) - kernel[:, ys == 0].mean(axis=1)


def operator_norm_barrier(xs, ys, margin=1.0):
    """The smallest operator norm ||O|| that any model with logit s <psi|O|psi> needs to give every training state
    its label with margin ``margin`` in <O> (<O> >= m on class 1, <= -m on class 0).

    For states a, b of opposite labels, 2m <= <a|O|a> - <b|O|b> <= ||O|| ||aa^dag - bb^dag||_1, and the trace norm
    of the rank-2 difference is sqrt((|a|^2 + |b|^2)^2 - 4|<a|b>|^2) (2 sqrt(1 - F) for unit vectors). The
    barrier is the largest 2m / ||aa^dag - bb^dag||_1 over oppositely labelled pairs: above 1, no QNN (||Z|| = 1)
    and no bounded observable can fit the labels.
    """
    xs, ys = np.asarray(xs), np.asarray(ys)
    a, b = xs[ys == 1], xs[ys == 0]
    norms = (np.linalg.norm(a, axis=1)[:, None] ** 2 + np.linalg.norm(b, axis=1)[None, :] ** 2) ** 2
    trace_norm = np.sqrt(np.clip(norms - 4 * overlaps(a, b), 0.0, None))
    return float(2 * margin / max(trace_norm.min(), 1e-300))


# -------------------------------------------------------------------------------- the cells
def cell_folds(seed, ds, poison, alpha, run, folds):
    """The cross-validation folds of one cell (alpha, run): stratified on the poisoned labels, from the seed."""
    rs = models.unit_seed(seed, "folds", ds.name, poison, alpha, run) % 2**32
    return StratifiedKFold(folds, shuffle=True, random_state=rs)


def cells_of(ds, poison, alphas, *, runs, seed, fid):
    """Every (alpha, run) of a poison with its poisoned copy ``(xs, ys, idx)``, as the phase part draws them."""
    return [((alpha, run), pu.poisoned_copy(ds, poison, alpha, seed=seed, run=run, law=fid.feature_noise))
            for alpha in alphas for run in range(runs)]


def scores(pred_train, pred_val, ys, idx, ds):
    """train_acc, val_acc and flip_fit of one cell's 0/1 predictions."""
    correct = np.asarray(pred_train) == np.asarray(ys)
    return {"train_acc": pu.as_float(correct.mean()), "val_acc": pu.as_float(np.mean(np.asarray(pred_val) == ds.ys_val)),
            "flip_fit": pu.as_float(correct[idx].mean()) if len(idx) else float("nan")}


def sign_accuracy(y, score):
    return np.mean((np.asarray(score) > 0) == (np.asarray(y) > 0))


SIGN_ACCURACY = make_scorer(sign_accuracy)


def choice_text(search):
    return " ".join(f"{k.rpartition('__')[2]}={v}" for k, v in search.best_params_.items())


# ------------------------------------------------------------------------ the closed-form and sklearn controls
def fit_meandiff(xs, ys, xs_val, cv, cfg):
    scores_train = meandiff_scores(overlaps(xs, xs), ys)
    return scores_train > 0, meandiff_scores(overlaps(xs_val, xs), ys) > 0, "", 0


def fit_kernel_ridge(xs, ys, xs_val, cv, cfg):
    """Kernel ridge regression of the labels +-1 on the fidelity kernel, its ridge by cross-validation. The grid
    is relative to the kernel's scale (ridge = r * mean |psi|^4, the mean diagonal): unnormalised encodings have
    large kernels."""
    kernel = overlaps(xs, xs)
    scale = float(np.mean(np.diag(kernel)))
    search = GridSearchCV(KernelRidge(kernel="precomputed"), {"alpha": [r * scale for r in cfg["ridge"]]},
                          scoring=SIGN_ACCURACY, cv=cv)
    search.fit(kernel, 2.0 * ys - 1)
    choice = f"ridge={search.best_params_['alpha'] / scale:g}"
    return search.predict(kernel) > 0, search.predict(overlaps(xs_val, xs)) > 0, choice, len(ys)


def fit_knn(xs, ys, xs_val, cv, cfg, ks):
    search = GridSearchCV(KNeighborsClassifier(metric="precomputed"), {"n_neighbors": ks}, cv=cv)
    search.fit(fidelity_distance(xs, xs), ys)
    return (search.predict(fidelity_distance(xs, xs)), search.predict(fidelity_distance(xs_val, xs)),
            choice_text(search), 0)


def pca_components(ds, spec, folds):
    """P for ``linear pca<P>``: the parameter count of the spec's QNN, or fewer where a fold holds fewer rows."""
    qnn = pu.build_model("qnn", spec["match"], ds.xs.shape[1])
    return min(int(np.prod(qnn.param_shape)), len(ds.ys) * (folds - 1) // folds - 1)


def control_arch(ds, spec, cv_cfg):
    """The arch a control's rows carry: ``pca`` becomes ``pca<P>``."""
    return f"pca{pca_components(ds, spec, cv_cfg['folds'])}" if spec["arch"] == "pca" else spec["arch"]


def fit_linear(xs, ys, xs_val, cv, cfg, components):
    """Logistic regression on the top principal components of the (real) amplitudes, C by cross-validation (one
    PCA per fold, shared by the C grid)."""
    features, features_val = datar.real_features(xs), datar.real_features(xs_val)

    def fitted(rows, C, pca=None):
        pca = pca or PCA(components, random_state=0).fit(features[rows])
        return pca, LogisticRegression(C=C, max_iter=2000).fit(pca.transform(features[rows]), ys[rows])

    held = np.zeros((cv.get_n_splits(), len(cfg["C"])))
    for k, (fit_rows, held_rows) in enumerate(cv.split(features, ys)):
        pca = PCA(components, random_state=0).fit(features[fit_rows])
        for j, C in enumerate(cfg["C"]):
            held[k, j] = fitted(fit_rows, C, pca)[1].score(pca.transform(features[held_rows]), ys[held_rows])
    best = cfg["C"][int(np.argmax(held.mean(axis=0)))]
    pca, model = fitted(np.arange(len(ys)), best)
    return (model.predict(pca.transform(features)), model.predict(pca.transform(features_val)), f"C={best}",
            components + 1)


def sklearn_unit(ds, spec, poison, alphas, *, runs, seed, fid, cv_cfg, chunk=None):
    """One closed-form or scikit-learn control on every (alpha, run) of a poison: controls.csv rows."""
    fit = {"meandiff": fit_meandiff, "ridge": fit_kernel_ridge, "k1": lambda *a: fit_knn(*a, ks=[1]),
           "tuned": lambda *a: fit_knn(*a, ks=cv_cfg["k"]),
           "pca": lambda *a: fit_linear(*a, components=pca_components(ds, spec, cv_cfg["folds"]))}[spec["arch"]]
    rows = []
    for (alpha, run), (xs, ys, idx) in cells_of(ds, poison, alphas, runs=runs, seed=seed, fid=fid):
        cv = cell_folds(seed, ds, poison, alpha, run, cv_cfg["folds"])
        pred_train, pred_val, choice, params = fit(xs, ys, ds.xs_val, cv, cv_cfg)
        rows.append(control_row(ds, spec, poison, alpha, run, arch=control_arch(ds, spec, cv_cfg), params=params,
                                choice=choice)
                    | scores(pred_train, pred_val, ys, idx, ds))
    return rows


def control_row(ds, spec, poison, alpha, run, *, arch=None, recipe=None, params, choice=""):
    return {"dataset": ds.name, "gauge": ds.gauge, "model": spec["model"], "arch": arch or spec["arch"],
            "recipe": recipe or spec["recipe"], "params": params, "poison": poison, "alpha": alpha, "run": run,
            "choice": choice}


# ------------------------------------------------------------------------------ controls the engine trains
def trained_unit(ds, spec, poison, alphas, *, runs, seed, fid, cv_cfg, chunk=None):
    """A model the engine trains (a QNN ablation, an observable) with its plain recipe, as the phase part does."""
    rows = pu.resilience_unit(ds, spec["model"], spec["arch"], poison, alphas, runs=runs,
                              schedule=pu.Schedule(**spec["schedule"]), seed=seed, fid=fid, chunk=chunk)
    model = pu.model_for(ds, spec["model"], spec["arch"], fid)
    params = models.trained_parameters(model)
    return [control_row(ds, spec, poison, r["alpha"], r["run"], params=params)
            | {k: r[k] for k in ("train_acc", "val_acc", "flip_fit")} for r in rows]


def candidates(cfg):
    """The MLP's candidate recipes for cross-validation: plain, each defence at each strength of its grid (its
    standalone strength included), and early stopping after each epoch count of its grid (read off the plain
    runs' recorded epochs)."""
    return ([("plain", 0.0)] + [(name, s) for name in DEFENCES for s in sorted({*cfg[name], cfg["defaults"][name]})]
            + [("early_stop", e) for e in cfg["stop_epochs"]])


def row_masks(n, idx, held):
    return {"poisoned": pu.row_mask(n, idx), "held": pu.row_mask(n, held)}


DEFENCE_CHUNK = 64
"""MLP trainings per compiled program of the defences, at least: a small MLP's matrix products run faster wide (on
the 2-core CPU, 60 trainings took 25 s in programs of 8 or more, 33 s in programs of 2)."""


def defence_chunk(chunk):
    return None if chunk is None else max(chunk, DEFENCE_CHUNK)


class DefenceTraining(NamedTuple):
    """One MLP training of the defences: its cell (alpha, run, recipe, split), poisoned set, training rows, the
    recipe's and the split's per-run arrays, and the identity its random draws derive from."""

    cell: tuple
    xs: np.ndarray
    ys: np.ndarray
    fit_rows: np.ndarray
    aux: dict
    draw: tuple


def defence_trainings(ds, spec, poison, alphas, *, runs, seed, fid, cv_cfg, chunk=None):
    """Train the MLP with every trained candidate recipe (plain and each defence strength) on every (alpha, run) and
    split (each cross-validation fold, then the full poisoned set), recording the epochs of the early-stopping grid
    and the last. Trainings with the same minibatches per epoch share a compiled program (a fold's plan is not
    padded to the full set's steps, which would cost it a step per epoch that changes nothing). Returns a
    :class:`DefenceRuns`."""
    sched = pu.Schedule(**spec["schedule"])
    n, batch, folds = len(ds.ys), sched.batch or len(ds.ys), cv_cfg["folds"]
    trained = [c for c in candidates(cv_cfg) if c[0] != "early_stop"]
    groups = {}  # minibatches per epoch -> [DefenceTraining]
    for (alpha, run), (xs, ys, idx) in cells_of(ds, poison, alphas, runs=runs, seed=seed, fid=fid):
        splits = [*cell_folds(seed, ds, poison, alpha, run, folds).split(xs, ys), (np.arange(n), np.arange(0))]
        for recipe in trained:
            for split, (fit_rows, held_rows) in enumerate(splits):
                draw = ("defence", ds.name, ds.gauge, spec["arch"], poison, alpha, run, *recipe, split)
                groups.setdefault(-(-len(fit_rows) // batch), []).append(DefenceTraining(
                    (alpha, run, recipe, split), xs, ys, fit_rows,
                    models.defence_aux(*recipe) | row_masks(n, idx, held_rows), draw))
    cells, metrics = [], []
    for steps, group in sorted(groups.items()):
        cells += [t.cell for t in group]
        metrics.append(train_defences(ds, spec, group, steps=steps, seed=seed, fid=fid, cv_cfg=cv_cfg, chunk=chunk))
    return DefenceRuns(cells, {k: np.concatenate([m[k] for m in metrics]) for k in metrics[0]}, cv_cfg, sched.epochs)


def train_defences(ds, spec, group, *, steps, seed, fid, cv_cfg, chunk):
    """The recorded metrics of one group of :func:`defence_trainings` (``steps`` minibatches per epoch each)."""
    sched = pu.Schedule(**spec["schedule"])
    model = pu.model_for(ds, spec["model"], spec["arch"], fid)
    batch = sched.batch or len(ds.ys)
    data = {"x": model.prepare(np.stack([t.xs for t in group])), "y": np.stack([t.ys for t in group])}
    plans = [models.subset_plan(models.unit_rng(seed, "order", *t.draw), t.fit_rows, steps * batch, batch,
                                sched.epochs) for t in group]
    params0 = models.init_runs(model, [models.unit_key(seed, "init", *t.draw) for t in group])
    record = np.isin(np.arange(1, sched.epochs + 1), [*cv_cfg["stop_epochs"], sched.epochs])
    out = models.train_runs(models.Trainer(model, loss=models.defended_loss, batch_size=batch,
                                           recipe=replace(fid.recipe("mlp", "train"), weight_decay=True)),
                            params0, data, models.stack_plans(plans), sched.lr,
                            aux=models.stack_plans([t.aux for t in group]), shared=pu.shared_validation(model, ds),
                            record=record, chunk=chunk)
    return out.metrics


class DefenceRuns:
    """The recorded metrics of :func:`defence_trainings`, read by cell: (alpha, run, recipe, split, epoch)."""

    def __init__(self, cells, metrics, cfg, epochs):
        self.where = {cell: i for i, cell in enumerate(cells)}
        self.metrics, self.cfg, self.epochs = metrics, cfg, epochs
        self.cells = list(dict.fromkeys((a, r) for a, r, _, _ in cells))

    def at(self, alpha, run, recipe, split, epoch):
        i = self.where[(alpha, run, recipe, split)]
        return {k: pu.as_float(self.metrics[k][i, epoch - 1]) for k in ("train_acc", "val_acc", "flip_fit", "held_acc")}

    def trained_as(self, name, strength):
        """The trained recipe and epoch of a candidate: early stopping is plain training read at an epoch."""
        return (("plain", 0.0), int(strength)) if name == "early_stop" else ((name, strength), self.epochs)

    def cv_score(self, alpha, run, candidate):
        recipe, epoch = self.trained_as(*candidate)
        return np.mean([self.at(alpha, run, recipe, k, epoch)["held_acc"] for k in range(self.cfg["folds"])])

    def best_candidate(self, alpha, run):
        """The candidate of best mean held-out accuracy over the folds (ties: the first of :func:`candidates`)."""
        options = candidates(self.cfg)
        return options[int(np.argmax([self.cv_score(alpha, run, c) for c in options]))]

    def full(self, alpha, run, candidate):
        recipe, epoch = self.trained_as(*candidate)
        return reported(alpha, self.at(alpha, run, recipe, self.cfg["folds"], epoch))

    def early_stop(self, alpha, run):
        """Plain training on the first fold's training rows, stopped at the recorded epoch of best accuracy on its
        held-out rows (poisoned labels; ties: the earliest)."""
        stops = sorted({*map(int, self.cfg["stop_epochs"]), self.epochs})
        held = [self.at(alpha, run, ("plain", 0.0), 0, e)["held_acc"] for e in stops]
        best = stops[int(np.argmax(held))]
        return f"epochs={best}", reported(alpha, self.at(alpha, run, ("plain", 0.0), 0, best))

    def choices(self, alpha, run):
        """The rows of one cell: recipe -> (choice, scores)."""
        picked = {name: ("", self.full(alpha, run, (name, self.cfg["defaults"][name]))) for name in DEFENCES}
        best = self.best_candidate(alpha, run)
        return picked | {"early_stop": self.early_stop(alpha, run),
                         "tuned": (f"{best[0]}={best[1]:g}", self.full(alpha, run, best))}


def reported(alpha, scores):
    """A cell's controls.csv scores (flip_fit NaN where nothing is poisoned)."""
    return {"train_acc": scores["train_acc"], "val_acc": scores["val_acc"],
            "flip_fit": scores["flip_fit"] if alpha > 0 else float("nan")}


def defences_unit(ds, spec, poison, alphas, *, runs, seed, fid, cv_cfg, chunk=None):
    """The MLP with the classical label-noise defences, and the recipe that cross-validation picks among them.

    Rows (see :class:`DefenceRuns`): each defence at its preset strength on the full set; ``early_stop``;
    ``tuned``: the candidate of best cross-validated accuracy, as trained on the full set.
    """
    runs_ = defence_trainings(ds, spec, poison, alphas, runs=runs, seed=seed, fid=fid, cv_cfg=cv_cfg,
                              chunk=defence_chunk(chunk))
    params = models.trained_parameters(pu.model_for(ds, spec["model"], spec["arch"], fid))
    return [control_row(ds, spec, poison, alpha, run, recipe=recipe, params=params, choice=choice) | row
            for alpha, run in runs_.cells for recipe, (choice, row) in runs_.choices(alpha, run).items()]


def tuned_choices(ds, study, *, runs, seed, fid, cv_cfg, chunk=None):
    """The candidate recipe that cross-validation picks for each run's poisoned set of an unlearning study (the
    teacher of ``mlp ... tuned``): ``(name, strength)`` per run."""
    spec = {"model": study.model, "arch": study.arch, "schedule": asdict(study.teacher)}
    trained = defence_trainings(ds, spec, study.poison, [study.alpha], runs=runs, seed=seed, fid=fid, cv_cfg=cv_cfg,
                                chunk=defence_chunk(chunk))
    return [trained.best_candidate(study.alpha, run) for run in range(runs)]


FITS = {"trained": trained_unit, "defences": defences_unit, "sklearn": sklearn_unit}
"""How each control of a preset's ``controls.models`` table is fitted (its ``fit`` field)."""


# ------------------------------------------------------------------------------------ memorisation
def random_label_sets(ds, n_train, runs, seed):
    """Per run: ``n_train`` clean training inputs chosen at random, with uniformly random 0/1 labels."""
    sets = []
    for run in range(runs):
        rng = models.unit_rng(seed, "random labels", ds.name, n_train, run)
        rows = rng.choice(len(ds.ys), n_train, replace=False)
        sets.append((ds.xs[rows], rng.integers(0, 2, n_train).astype(ds.ys.dtype)))
    return sets


def memorise_unit(ds, spec, *, n_trains, runs, factor, seed, fid, chunk=None):
    """How many random labels a model fits (Zhang et al. 2017; Gil-Fuster, Eisert & Bravo-Prieto 2024).

    For each n_train, R runs train on random labels for ``factor`` times the model's epochs, minibatches reshuffled
    every epoch (for every model, so that one training is both budgets), recording after the model's own epochs
    and at the end; ``random_fit`` is the better training accuracy of the two, ``epochs`` the budget that reached
    it. Sizes that need the same number of minibatches per epoch train as one program (sets padded to whole
    minibatches, the padding never drawn).
    """
    sched = pu.Schedule(**spec["schedule"])
    model = pu.model_for(ds, spec["model"], spec["arch"], fid)
    params = models.trained_parameters(model)
    budgets = (sched.epochs, factor * sched.epochs)
    recipe = replace(fid.recipe(spec["model"], "train"), order="epochs")
    rows = []
    for steps, sizes in groupby_steps(n_trains, sched.batch):
        width = steps * (sched.batch or max(sizes))
        cells = [(n, run) for n in sizes for run in range(runs)]
        sets = {n: random_label_sets(ds, n, runs, seed) for n in sizes}
        draws = [("memorise", ds.name, ds.gauge, spec["model"], spec["arch"], n, run) for n, run in cells]
        data = {"x": model.prepare(np.stack([pad_rows(sets[n][run][0], width) for n, run in cells])),
                "y": np.stack([pad_rows(sets[n][run][1], width) for n, run in cells])}
        plans = [models.subset_plan(models.unit_rng(seed, "order", *d), np.arange(n), width, width // steps,
                                    budgets[1]) for d, (n, _) in zip(draws, cells)]
        real = np.stack([pu.row_mask(width, np.arange(n)) for n, _ in cells])
        out = models.train_runs(models.Trainer(model, batch_size=width // steps, recipe=recipe),
                                models.init_runs(model, [models.unit_key(seed, "init", *d) for d in draws]),
                                data, models.stack_plans(plans), sched.lr, aux={"poisoned": real},
                                shared=pu.shared_validation(model, ds), record=np.isin(np.arange(1, budgets[1] + 1),
                                                                                       budgets), chunk=chunk)
        for i, (n, run) in enumerate(cells):
            fits = out.metrics["flip_fit"][i, [budgets[0] - 1, budgets[1] - 1]]  # every real row is a random label
            best = int(np.argmax(fits))
            rows.append({"dataset": ds.name, "model": spec["model"], "arch": spec["arch"], "recipe": spec["recipe"],
                         "params": params, "n_train": n, "run": run, "random_fit": pu.as_float(fits[best]),
                         "epochs": budgets[best]})
    return sorted(rows, key=lambda r: (r["n_train"], r["run"]))


def groupby_steps(sizes, batch):
    """Training-set sizes grouped by their minibatches per epoch (``batch`` None: one, the whole set)."""
    groups = {}
    for n in sizes:
        groups.setdefault(-(-n // batch) if batch else 1, []).append(n)
    return sorted(groups.items())


def pad_rows(array, width):
    """``array`` with rows of zeros appended up to ``width`` rows."""
    return np.concatenate([array, np.zeros((width - len(array), *array.shape[1:]), array.dtype)])
