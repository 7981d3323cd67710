"""Unlearning methods: one registry, one engine, either model.

A method is a loss over a minibatch stream run by the engine of ``models.py`` (or a one-shot step), plus a few
declarative choices: where it starts (the teacher, a fresh initialisation, or the teacher with its last layers
re-initialised), which rows its minibatches come from (the retain set, or retain and forget rows labelled one way
or another) and in which order, a 0/1 mask multiplied into its updates (default all ones), and its hyper-parameters
(traced per-run values, so a sweep over any of them compiles once). Every part of a study (unlearn, sweep, audit)
reads ``METHODS``: a method added here appears everywhere without further code.

Conventions: a *population* is R runs of one study (``Population``): teachers with a leading run axis and each
run's retain and forget arrays. ``trained_x, trained_y`` is the forget set as the teacher saw it (poisoned);
``forget_x, forget_y`` the same samples clean; ``kl_x`` the inputs of SCRUB's forget term (fidelity item d).
"""

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import models


@dataclass
class Population:
    """R runs of an unlearning study: the model, teacher parameters and per-run arrays (leading axis R).

    ``inputs`` holds retain_x/_y/_t, forget_x/_y, trained_x/_y/_t, kl_x/_t (``_t``: teacher logits);
    ``shared`` the validation set; ``draws`` each run's identity, from which its random draws derive.
    """

    model: object
    params: object
    inputs: dict
    shared: dict
    draws: list

    @property
    def runs(self):
        return len(self.draws)

    def take(self, idx):
        """The population of runs ``idx`` (repeats allowed: sweep cells share a run's teacher)."""
        return Population(self.model, models.take_runs(self.params, idx), models.take_runs(self.inputs, idx),
                          self.shared, [self.draws[i] for i in idx])


def as_given(hp):
    """A method whose loss or step reads its hyper-parameters themselves."""
    return hp


@dataclass(frozen=True)
class Method:
    """An unlearning method (see the module docstring). ``hparams``: name -> default (the paper's where it has
    one); ``key``: the hyper-parameter its sweep varies, over ``grid`` (the paper preset's values). ``weights``
    maps the hyper-parameters to what the loss reads: methods that differ only in the weights of one loss's terms
    share its compiled program. ``forget_inputs``: the forget set a forget term reads, as trained ("trained") or
    SCRUB's (``kl_x``, fidelity item d)."""

    loss: object = None
    step: object = None
    start: str = "teacher"
    rows: str = "retain"
    plan: str = "epochs"
    mask: str = "all"
    hparams: dict = field(default_factory=dict)
    weights: object = as_given
    forget_inputs: str = "trained"
    key: str | None = None
    grid: tuple = ()
    whole_forget: bool = False  # the loss reads the whole forget set at every step (counted in grad_evals)
    paper: bool = False


# ------------------------------------------------------------------------------------------- losses
def _hp(aux, name):
    return aux["hp"][name]


def _kl_term(t, teacher_logits, logits, mask):
    return t.recipe.reduce(t.recipe.kl(teacher_logits, logits), mask)


def retain_loss(t, params, batch, mask, aux):
    """CE(retain) + kl_w KL(teacher || student)(retain): retrain, finetune, EU-k and CF-k (kl_w = 0)."""
    logits = t.model.logits(params, batch["x"])
    return models.ce_term(t, logits, batch["y"], mask) + _hp(aux, "kl_w") * _kl_term(t, batch["t"], logits, mask)


def _with_forget_logits(t, params, batch, forget_x):
    """Logits of the minibatch and of the whole forget set in one forward pass: one circuit to compile, not two
    (the QNN programs of SCRUB, gradient ascent and NegGrad+ compile 30-45% faster)."""
    logits = t.model.logits(params, models.concat_rows([batch["x"], forget_x]))
    rows = models.rows_of(batch["x"])
    return logits[:rows], logits[rows:]


def forget_term_loss(t, params, batch, mask, aux):
    """ce CE(retain) + kl KL(teacher || student)(retain) - forget_kl KL(teacher || student)(forget set)
    - forget_ce CE(forget set, its labels as trained), the forget terms over the whole forget set ``aux['forget']``
    (inputs and teacher logits): SCRUB, gradient ascent and NegGrad+, whose weights (``Method.weights``) are
    traced values, so the three share one compiled program."""
    logits, forget = _with_forget_logits(t, params, batch, aux["forget"]["x"])
    retain = (_hp(aux, "ce") * models.ce_term(t, logits, batch["y"], mask)
              + _hp(aux, "kl") * _kl_term(t, batch["t"], logits, mask))
    return (retain - _hp(aux, "forget_kl") * jnp.mean(t.recipe.kl(aux["forget"]["t"], forget))
            - _hp(aux, "forget_ce") * jnp.mean(t.recipe.ce(forget, aux["trained_y"])))


def joined_loss(t, params, batch, mask, aux):
    """ce CE(row's label) + kl Bernoulli KL(row's teacher || student), no temperature, over retain and forget rows
    (``Method.rows`` labels them and chooses their teachers): random labels, SalUn and bad teacher, one program."""
    logits = t.model.logits(params, batch["x"])
    per_row = _hp(aux, "ce") * t.recipe.ce(logits, batch["y"]) + _hp(aux, "kl") * models.bernoulli_kl(batch["t"],
                                                                                                     logits)
    return t.recipe.reduce(per_row, mask)


def minmax_loss(t, params, batch, mask, aux):
    """Canonical SCRUB (Kurmanji et al. 2023): on forget rows the max-step loss -KL(teacher || student), on
    retain rows the min-step loss CE + kl_w KL. Minibatches are pure (see ``minmax_plan``)."""
    logits = t.model.logits(params, batch["x"])
    kl = models.bernoulli_kl(batch["t"], logits)
    per_row = jnp.where(batch["f"] > 0, -kl, t.recipe.ce(logits, batch["y"]) + _hp(aux, "kl_w") * kl)
    return t.recipe.reduce(per_row, mask)


# ------------------------------------------------------------------- a method's hyper-parameters, as its loss's
def retain_weights(hp):
    """The retain terms alone (EU-k's and CF-k's ``k`` only chooses their mask)."""
    return {"kl_w": hp["kl_w"]}


def scrub_weights(hp):
    """The paper's SCRUB: retain terms - fo_w KL(teacher || student) on the whole forget set (inputs ``kl_x``)."""
    return {"ce": 1.0, "kl": hp["kl_w"], "forget_kl": hp["fo_w"], "forget_ce": 0.0}


def grad_ascent_weights(hp):
    """Gradient ascent: retain terms - fo_w CE(forget set with its poisoned labels)."""
    return {"ce": 1.0, "kl": hp["kl_w"], "forget_kl": 0.0, "forget_ce": hp["fo_w"]}


def neggrad_plus_weights(hp):
    """NegGrad+ (Kurmanji et al. 2023): beta CE(retain) - (1 - beta) CE(forget, trained-with labels)."""
    return {"ce": hp["beta"], "kl": 0.0, "forget_kl": 0.0, "forget_ce": 1 - hp["beta"]}


def relabelled_weights(hp):
    """Random labels and SalUn: CE on retain rows and randomly relabelled forget rows."""
    return {"ce": 1.0, "kl": 0.0}


def bad_teacher_weights(hp):
    """Bad teacher (Chundawat et al. 2023): Bernoulli KL to the row's teacher (competent on retain rows,
    randomly initialised on forget rows)."""
    return {"ce": 0.0, "kl": 1.0}


# --------------------------------------------------------------------------------- one-shot steps
NEWTON_EXACT_MAX = 40  # parameters up to which the damped curvature matrix is built and solved directly
NEWTON_CG_STEPS = 20  # at most this many conjugate-gradient steps above that: G is a few large eigenvalues over
#                      the damping, and CG reaches float32 precision in about 10 on the quick MNIST teachers


def gauss_newton(logits_of, ce, ys, w):
    """Gradient and Gauss-Newton-vector product of L(w) = mean_i ce(logits_of(w)_i, y_i).

    G = J^T diag(ce''(z) / n) J with J the Jacobian of the logits and ce'' clipped at 0: positive semi-definite
    everywhere, and equal to the Hessian for a logistic regression (logits linear in w). The Hessian itself is
    indefinite at our QNN and ReLU-MLP teachers (quick MNIST QNN: eigenvalues from -25 to 1848), where damped
    conjugate gradients on it do not converge."""
    z, pullback = jax.vjp(logits_of, w)
    _, push = jax.linearize(logits_of, w)
    slope = jax.grad(lambda z: jnp.mean(ce(z, ys)))
    curvature = jnp.maximum(jax.grad(lambda z: jnp.sum(slope(z)))(z), 0.0)  # ce is per sample: diagonal in z
    return pullback(slope(z))[0], lambda v: pullback(curvature * push(v))[0]


def newton_update(logits_of, ce, ys, w, damping):
    """w - (G + damping I)^-1 grad L(w) with G the Gauss-Newton matrix (``gauss_newton``): solved directly up to
    ``NEWTON_EXACT_MAX`` parameters, by conjugate gradients otherwise."""
    grad, product = gauss_newton(logits_of, ce, ys, w)

    def damped(v):
        return product(v) + damping * v

    if w.shape[0] <= NEWTON_EXACT_MAX:
        return w - jnp.linalg.solve(jax.vmap(damped)(jnp.eye(w.shape[0], dtype=w.dtype)), grad)
    tol = 10 * float(jnp.finfo(w.dtype).eps)  # stop at convergence: another step would divide 0 by 0
    delta, _ = jax.scipy.sparse.linalg.cg(damped, grad, tol=tol, maxiter=NEWTON_CG_STEPS)
    return w - delta


def newton_step(t, params, aux, key):
    """Certified-removal style Newton step (Guo et al. 2020) on the retain loss, plus Gaussian noise sigma.

    At a minimiser of the full training loss, grad L_retain = -(n_f / n_r) grad L_forget, so this is the
    teacher moved by G_retain^-1 times the forget set's gradient contribution (G the Gauss-Newton matrix, the
    Hessian of Guo et al.'s convex models).
    """
    flat, unravel = ravel_pytree(params)
    moved = newton_update(lambda w: t.model.logits(unravel(w), aux["retain_x"]), t.recipe.ce, aux["retain_y"],
                          flat, _hp(aux, "damping"))
    return unravel(moved + _hp(aux, "sigma") * jax.random.normal(key, flat.shape, flat.dtype))


def retain_fisher(model, params, xs):
    """Diagonal Fisher information of the Bernoulli output on ``xs``: mean_i p_i (1 - p_i) (d logit_i)^2."""

    def add(total, x):
        logit, grads = jax.value_and_grad(lambda p: model.logits(p, jax.tree.map(lambda a: a[None], x))[0])(params)
        p = jax.nn.sigmoid(logit)
        return jax.tree.map(lambda s, g: s + (p * (1 - p) * g**2).astype(s.dtype), total, grads), None  # item l

    total, _ = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), xs)
    return jax.tree.map(lambda s: s / models.rows_of(xs), total)


def fisher_step(t, params, aux, key):
    """Fisher forgetting (Golatkar et al. 2020): Gaussian noise of variance noise * min(1 / F_retain, 1e3)
    per parameter, F the diagonal Fisher of the retain set: directions the retain set does not pin down move."""
    fisher = retain_fisher(t.model, params, aux["retain_x"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.tree.unflatten(tree, list(jax.random.split(key, len(leaves))))
    return jax.tree.map(
        lambda p, f, k: p + jnp.sqrt(_hp(aux, "noise") * jnp.minimum(1 / (f + 1e-8), 1e3)) * jax.random.normal(
            k, p.shape, p.dtype), params, fisher, keys)


# ------------------------------------------------------------------------------------- the registry
UNIT_GRID = tuple(round(0.1 * k, 1) for k in range(10))
METHODS = {
    "retrain": Method(retain_loss, start="fresh", hparams={"kl_w": 0.0}, weights=retain_weights, paper=True),
    "finetune": Method(retain_loss, hparams={"kl_w": 0.0}, weights=retain_weights, paper=True),
    "scrub": Method(forget_term_loss, hparams={"kl_w": 0.0, "fo_w": 0.2}, weights=scrub_weights, forget_inputs="kl",
                    key="fo_w", grid=UNIT_GRID, whole_forget=True, paper=True),
    "grad_ascent": Method(forget_term_loss, hparams={"kl_w": 0.0, "fo_w": 0.2}, weights=grad_ascent_weights,
                          key="fo_w", grid=UNIT_GRID, whole_forget=True, paper=True),
    "neggrad_plus": Method(forget_term_loss, hparams={"beta": 0.9}, weights=neggrad_plus_weights, key="beta",
                           grid=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99), whole_forget=True),
    "scrub_minmax": Method(minmax_loss, rows="joined", plan="minmax", key="msteps", grid=(1, 2, 3, 5, 8, 12),
                           hparams={"kl_w": 0.001, "msteps": 3, "forget_lr": 1.0},  # SCRUB's alpha / gamma
                           weights=retain_weights),
    "random_labels": Method(joined_loss, rows="relabelled", weights=relabelled_weights),
    "salun": Method(joined_loss, rows="relabelled", mask="saliency", hparams={"gamma": 0.5}, weights=relabelled_weights,
                    key="gamma", grid=(0.1, 0.3, 0.5, 0.7, 0.9)),
    "bad_teacher": Method(joined_loss, rows="bad_teacher", weights=bad_teacher_weights),
    "eu_k": Method(retain_loss, start="reinit_last", mask="last_layers", hparams={"kl_w": 0.0, "k": 1},
                   weights=retain_weights, key="k", grid=(1, 2, 3)),
    "cf_k": Method(retain_loss, mask="last_layers", hparams={"kl_w": 0.0, "k": 1}, weights=retain_weights, key="k",
                   grid=(1, 2, 3)),
    "newton": Method(step=newton_step, hparams={"damping": 0.1, "sigma": 0.0}, key="damping",
                     grid=(0.001, 0.01, 0.1, 1.0, 10.0)),
    "fisher": Method(step=fisher_step, hparams={"noise": 1e-6}, key="noise",
                     grid=(1e-8, 1e-7, 1e-6, 1e-5, 1e-4)),
}
"""Hyper-parameters: kl_w, fo_w (SCRUB and gradient-ascent weights), beta (NegGrad+), msteps (epochs with max-steps)
and forget_lr (their learning rate, a factor of the study's), gamma (SalUn's saliency fraction), k (layers counted
from the output), damping and sigma (Newton), noise (Fisher). ``forget_lr`` multiplies the study's rate."""
PAPER_METHODS = tuple(name for name, m in METHODS.items() if m.paper)


def hyperparameters(method, runs, *, dtype=None, **values):
    """Per-run hyper-parameter arrays of a method (a name or a ``Method``): its defaults, overridden by ``values``
    (scalars or (R,) arrays), in ``dtype`` (default: the process's real dtype)."""
    return per_run((METHODS[method] if isinstance(method, str) else method).hparams | values, runs, dtype)


def per_run(table, runs, dtype=None):
    """Each value of ``table`` (a scalar or an (R,) array) as an (R,) array in ``dtype`` (default: the process's
    real dtype)."""
    return {k: np.broadcast_to(np.asarray(v, dtype or models.real_dtype()), (runs,)) for k, v in table.items()}


# ---------------------------------------------------------------------------- rows, starts, masks, plans
def _rows_retain(pop, rng_of):
    x = pop.inputs
    return {"x": x["retain_x"], "y": x["retain_y"], "t": x["retain_t"]}


def _joined(pop, forget):
    """Retain rows followed by forget rows (as trained), each array (R, n_r + n_f, ...); ``forget`` overrides."""
    x = pop.inputs
    rows = {"x": (x["retain_x"], x["trained_x"]), "y": (x["retain_y"], x["trained_y"]),
            "t": (x["retain_t"], x["trained_t"]),
            "f": (jnp.zeros_like(x["retain_y"]), jnp.ones_like(x["trained_y"]))}
    rows |= {k: (rows[k][0], v) for k, v in forget.items()}
    return {k: models.concat_rows(pair, axis=1) for k, pair in rows.items()}


def _rows_relabelled(pop, rng_of):
    """Forget rows with uniformly random labels (drawn once per run)."""
    shape = pop.inputs["trained_y"].shape[1]
    labels = np.stack([rng_of(draw, "random-labels").integers(0, 2, shape) for draw in pop.draws])
    return _joined(pop, {"y": jnp.asarray(labels, pop.inputs["trained_y"].dtype)})


def _rows_bad_teacher(pop, rng_of):
    """Forget rows whose teacher is a randomly initialised, incompetent model of the same kind."""
    model = pop.model
    bad = models.init_runs(model, [models.rng_key(rng_of(d, "bad-teacher")) for d in pop.draws])
    return _joined(pop, {"t": models.run_logits(model)(bad, pop.inputs["trained_x"])})


def _rows_joined(pop, rng_of):
    """Retain rows and forget rows as trained, with a flag ``f`` on the forget rows."""
    return _joined(pop, {})


ROWS = {"retain": _rows_retain, "relabelled": _rows_relabelled, "bad_teacher": _rows_bad_teacher,
        "joined": _rows_joined}


def fresh_params(pop, rng_of):
    """A fresh initialisation per run (the same for every method of a run: retrain and EU-k share it)."""
    return models.init_runs(pop.model, [models.rng_key(rng_of(d, "init")) for d in pop.draws])


def _reinit_last(pop, rng_of, mask):
    """The teacher with its masked (last) layers freshly initialised (EU-k)."""
    return jax.tree.map(lambda f, t, m: jnp.where(m > 0, f, t), fresh_params(pop, rng_of), pop.params, mask)


STARTS = {"teacher": lambda pop, rng_of, mask: pop.params, "fresh": lambda pop, rng_of, mask: fresh_params(pop, rng_of),
          "reinit_last": _reinit_last}


def last_layers_mask(pop, hp):
    """1 on the parameters of the last k layers (MLP Dense layers, QNN circuit layers), 0 elsewhere."""
    depth = jax.vmap(pop.model.layers_from_output)(pop.params)
    k = jnp.asarray(hp["k"])
    return jax.tree.map(lambda d, p: (d < k.reshape((-1,) + (1,) * (d.ndim - 1))).astype(p.dtype), depth, pop.params)


@functools.cache
def _saliency_program(model):
    def one(params, x, y, gamma):
        grads = jax.grad(lambda p: jnp.mean(models.bce(model.logits(p, x), y)))(params)
        flat, unravel = ravel_pytree(jax.tree.map(jnp.abs, grads))
        rank = jnp.argsort(jnp.argsort(-flat, stable=True))  # 0 = largest; ties (dead units, padding) by index
        return unravel((rank < jnp.round(gamma * flat.size)).astype(flat.dtype))

    return jax.jit(jax.vmap(one))


def saliency_mask(pop, hp):
    """SalUn (Fan et al. 2024): 1 on the fraction gamma of parameters with the largest |gradient| of the forget
    loss at the teacher (one ranking over all parameters), 0 elsewhere; gamma = 1 keeps everything. A ranking,
    not a quantile threshold: a ReLU MLP has many exactly-zero gradients, and ">= the quantile" kept them all."""
    return _saliency_program(pop.model)(pop.params, pop.inputs["trained_x"], pop.inputs["trained_y"],
                                        jnp.asarray(hp["gamma"]))


def all_parameters_mask(pop, hp):
    """1 everywhere: every method's updates go through a mask, so a method with one (EU-k, CF-k, SalUn) and one
    without share a compiled program (multiplying by 1 changes no bit)."""
    return jax.tree.map(jnp.ones_like, pop.params)


MASKS = {"all": all_parameters_mask, "last_layers": last_layers_mask, "saliency": saliency_mask}


def minmax_plan(rng, n_retain, n_forget, batch_size, epochs, msteps, forget_lr):
    """Canonical SCRUB's epochs: a pass of max-steps over the forget rows (only in the first ``msteps`` epochs;
    later such steps are empty, hence no-ops) at ``forget_lr`` times the rate, then a pass of min-steps over the
    retain rows. Rows: retain 0..n_r-1, forget n_r..n_r+n_f-1."""
    forget = models.epoch_plan(rng, n_forget, min(batch_size, n_forget), epochs)
    retain = models.epoch_plan(rng, n_retain, batch_size, epochs)
    pad = batch_size - forget["idx"].shape[2]
    early = (np.arange(epochs) < msteps)[:, None, None]
    forget_part = {"idx": np.pad(forget["idx"] + n_retain, ((0, 0), (0, 0), (0, pad))),
                   "mask": np.pad(forget["mask"] & early, ((0, 0), (0, 0), (0, pad))),
                   "scale": forget["scale"] * forget_lr, "draw": forget["draw"]}
    return {k: np.concatenate([forget_part[k], retain[k]], axis=1) for k in retain}


def method_plans(method, pop, rng_of, hp, *, recipe, n_rows, batch_size, epochs):
    """Each run's minibatch plan, stacked: the recipe's order over all rows, or ``minmax_plan``."""
    plans = []
    for r, draw in enumerate(pop.draws):
        rng = rng_of(draw, "plan")
        if method.plan == "minmax":
            n_forget = pop.inputs["trained_y"].shape[1]
            plans.append(minmax_plan(rng, n_rows - n_forget, n_forget, batch_size, epochs,
                                     int(hp["msteps"][r]), float(hp["forget_lr"][r])))
        else:
            plans.append(recipe.plan(rng, n_rows, batch_size, epochs))
    return models.stack_plans(plans)


# ------------------------------------------------------------------------------------------ metrics
def unlearn_metrics(model, params, data, aux, shared):
    """Accuracies on the training set as trained, validation, retain and forget (clean and as trained), and the
    validation predictions; one forward pass over all evaluation sets (one circuit shape to compile)."""
    sets = {"retain_acc": ("retain_x", "retain_y"), "forget_acc": ("forget_x", "forget_y"),
            "forget_poison_acc": ("trained_x", "trained_y")}
    correct, val_pred = models.evaluate_sets(model, params, [aux[x] for x, _ in sets.values()] + [shared["x_val"]],
                                             [aux[y] for _, y in sets.values()] + [shared["y_val"]])
    out = {name: jnp.mean(c) for name, c in zip([*sets, "val_acc"], correct)}
    n_retain, n_forget = correct[0].shape[0], correct[2].shape[0]
    out["train_acc"] = (n_retain * out["retain_acc"] + n_forget * out["forget_poison_acc"]) / (n_retain + n_forget)
    out["val_pred"] = val_pred
    return out


UNLEARN_METRICS = ("train_acc", "val_acc", "retain_acc", "forget_acc", "forget_poison_acc")


# ------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    """What a method did to a population: final parameters, metrics (epoch axis with ``every_epoch``), wall
    seconds without compilation and the sample-gradient evaluations spent, per run."""

    params: object
    metrics: dict
    run_s: float
    compile_s: float
    grad_evals: np.ndarray


@functools.cache
def step_program(trainer, step):
    """A one-shot step vmapped over runs and jitted, returning the moved parameters and their metrics."""
    def program(params, aux, key, shared):
        moved = step(trainer, params, aux, key)
        return moved, unlearn_metrics(trainer.model, moved, None, aux, shared)

    return jax.jit(jax.vmap(program, in_axes=(0, 0, 0, None)))


@functools.cache
def _evaluation_program(model):
    return jax.jit(jax.vmap(lambda p, x, s: unlearn_metrics(model, p, None, x, s), in_axes=(0, 0, None)))


def evaluate(pop, params, chunk=None):
    """``unlearn_metrics`` of parameters of each run on the population's sets: one program per model and shapes,
    shared by every method (it gives their epoch 0)."""
    metrics, compile_s, _ = models.map_runs(("evaluate", pop.model), _evaluation_program(pop.model),
                                            (params, pop.inputs), pop.shared, chunk=chunk,
                                            work=models.forward_rows(pop.inputs) / 3)
    return metrics, compile_s


def run_method(name, pop, rng_of, *, schedule, recipe, hp=None, lr=None, every_epoch=True, chunk=None):
    """Unlearn a population with method ``name`` (a registry name, or a ``Method``); per-run ``hp`` (defaults from
    the registry) and ``lr`` (default the schedule's). ``rng_of(draw, purpose)`` gives the NumPy generator of one
    random draw of a run.

    Loss methods train ``schedule.epochs`` epochs (metrics at epoch 0 = the teacher, and after every epoch when
    ``every_epoch``); one-shot steps act once, and their metrics stay flat after epoch 1.
    """
    method = METHODS[name] if isinstance(name, str) else name
    dtype = models.param_dtype(pop.params)  # the MLP may train in float32 under complex128 (fidelity item j)
    hp = hyperparameters(method, pop.runs, dtype=dtype, **(hp or {}))
    lrs = np.broadcast_to(np.asarray(schedule.lr if lr is None else lr, dtype), (pop.runs,))
    forget = {"x": pop.inputs[f"{method.forget_inputs}_x"], "t": pop.inputs[f"{method.forget_inputs}_t"]}
    aux = pop.inputs | {"hp": per_run(method.weights(hp), pop.runs, dtype), "forget": forget}
    if method.step is not None:
        return _run_step(method, pop, rng_of, aux, schedule=schedule, recipe=recipe, every_epoch=every_epoch,
                         chunk=chunk)
    rows = ROWS[method.rows](pop, rng_of)
    n_rows = rows["y"].shape[1]
    batch = schedule.batch or n_rows
    aux["update_mask"] = MASKS[method.mask](pop, hp)
    start = STARTS[method.start](pop, rng_of, aux["update_mask"])
    plan = method_plans(method, pop, rng_of, hp, recipe=recipe, n_rows=n_rows, batch_size=batch,
                        epochs=schedule.epochs)
    trainer = models.Trainer(pop.model, method.loss, unlearn_metrics, batch, recipe, masked=True)
    out = models.train_runs(trainer, start, rows, plan, lrs, aux=aux, shared=pop.shared, every_epoch=every_epoch,
                            chunk=chunk)
    samples = plan["mask"].sum(axis=(1, 2, 3))
    n_forget = pop.inputs["trained_y"].shape[1]
    extra = (method.whole_forget * n_forget * plan["mask"].any(axis=3).sum(axis=(1, 2))
             + (method.mask == "saliency") * n_forget)
    metrics, compile_s = out.metrics, out.compile_s
    if every_epoch:
        metrics, seconds = _with_epoch_zero(pop, start, metrics, chunk)
        compile_s += seconds
    return Outcome(out.params, metrics, out.run_s / pop.runs, compile_s, samples + extra)


def _with_epoch_zero(pop, start, history, chunk):
    """Per-epoch metrics with the starting point's metrics prepended as epoch 0."""
    first, compile_s = evaluate(pop, start, chunk)
    return jax.tree.map(lambda a, h: np.concatenate([a[:, None], h], axis=1), first, history), compile_s


def _run_step(method, pop, rng_of, aux, *, schedule, recipe, every_epoch, chunk):
    trainer = models.Trainer(pop.model, recipe=recipe)
    keys = jnp.stack([models.rng_key(rng_of(d, "step")) for d in pop.draws])
    n_params = models.param_count(jax.tree.map(lambda a: a[0], pop.params))
    products = (n_params if n_params <= NEWTON_EXACT_MAX else NEWTON_CG_STEPS) if method.step is newton_step else 0
    evals = pop.inputs["retain_y"].shape[1] * (1 + 2 * products)  # at most; a product: forward + reverse pass
    (params, metrics), compile_s, run_s = models.map_runs(
        (trainer, method.step), step_program(trainer, method.step), (pop.params, aux, keys), pop.shared,
        chunk=chunk, work=evals)
    if every_epoch:  # epoch 0 = the teacher, then the stepped model at every epoch
        metrics, seconds = _with_epoch_zero(pop, pop.params, jax.tree.map(
            lambda a: np.repeat(a[:, None], schedule.epochs, 1), metrics), chunk)
        compile_s += seconds
    return Outcome(params, metrics, run_s / pop.runs, compile_s, np.full(pop.runs, evals))
