"""Loss-landscape analysis: Hessian-vector products, exact spectra, Lanczos, SLQ and Hutchinson.

The Hessian is taken with respect to all parameters (flattened), of the mean cross-entropy on a fixed
set of samples. Exact ``jax.hessian`` + ``eigvalsh`` where the parameter count allows; otherwise
Lanczos with full reorthogonalisation (top eigenvalues), stochastic Lanczos quadrature (spectral
density) and Hutchinson's estimator (trace), all built on Hessian-vector products.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import datar
import models
import poison_unlearn as pu

EXACT_MAX_PARAMS = 2000


def flat_loss(model, params, xs, ys, ce=models.bce, complex_params=False):
    """The mean loss ``ce`` as a function of one flat real parameter vector, and that vector.

    With ``complex_params`` the vector is [Re theta; Im theta] (twice as long; Im theta = 0 at the point): the
    authors' TensorCircuit parameters were complex, so their Hessian also has the imaginary directions.
    """
    flat, unravel = ravel_pytree(params)
    if complex_params:
        size = flat.shape[0]
        return (lambda w: jnp.mean(ce(model.logits(unravel(w[:size] + 1j * w[size:]), xs), ys)),
                jnp.concatenate([flat, jnp.zeros_like(flat)]))
    return (lambda w: jnp.mean(ce(model.logits(unravel(w), xs), ys))), flat


def lanczos(matvec, v0, steps):
    """``steps`` Lanczos iterations with full reorthogonalisation, inside one compiled loop.

    Returns the tridiagonal matrix T (steps x steps), whose eigenvalues (Ritz values) approximate the
    extreme eigenvalues of the symmetric operator ``matvec``.
    """
    basis = jnp.zeros((steps + 1, v0.shape[0]), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def body(i, carry):
        basis, alphas, betas = carry
        w = matvec(basis[i])
        alphas = alphas.at[i].set(w @ basis[i])
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        basis = basis.at[i + 1].set(jnp.where(beta > 1e-10, w / jnp.maximum(beta, 1e-30), 0.0))
        return basis, alphas, betas.at[i].set(beta)

    zeros = jnp.zeros(steps, v0.dtype)
    _, alphas, betas = jax.lax.fori_loop(0, steps, body, (basis, zeros, zeros))
    return jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)


def rademacher(key, num, dim, dtype):
    return jax.random.rademacher(key, (num, dim)).astype(dtype)


def quadrature(tridiagonals):
    """Nodes (Ritz values) and weights (squared first components) of Lanczos tridiagonal matrices.

    With unit-norm random start vectors, the spectral density is approximately the mean over starts of
    ``sum_j weights_j delta(x - nodes_j)`` (stochastic Lanczos quadrature), and the trace
    ``dim * mean(sum_j weights_j nodes_j)``.
    """
    nodes, vecs = np.linalg.eigh(np.asarray(tridiagonals))
    return nodes, vecs[..., 0, :] ** 2


@dataclass(frozen=True)
class Landscape:
    """Which loss Hessian: the model, its per-sample loss and whether parameters are taken as complex."""

    model: object
    ce: object = models.bce
    complex_params: bool = False

    def loss(self, params, xs, ys):
        return flat_loss(self.model, params, xs, ys, self.ce, self.complex_params)

    def hvp(self, params, xs, ys):
        loss, w = self.loss(params, xs, ys)
        return partial(models.hvp, loss, w), w


@partial(jax.jit, static_argnums=0)
def hessian_matrix(land, params, xs, ys):
    """The exact Hessian of the loss with respect to the flattened parameters."""
    return models.exact_hessian(*land.loss(params, xs, ys))


@partial(jax.jit, static_argnums=(0, 5))
def lanczos_tridiagonals(land, params, xs, ys, starts, steps):
    """Lanczos on the loss Hessian from each row of ``starts``, compiled once per landscape and shape."""
    matvec, _ = land.hvp(params, xs, ys)
    return jax.vmap(lambda v: lanczos(matvec, v, steps))(starts)


@partial(jax.jit, static_argnums=0)
def quadratic_forms(land, params, xs, ys, zs):
    """z.H z for each row z of ``zs``: their mean over Rademacher vectors is Hutchinson's trace estimate, and
    over the unit vectors the exact trace."""
    matvec, _ = land.hvp(params, xs, ys)
    return jnp.sum(zs * jax.vmap(matvec)(zs), axis=1)


def exact_trace(land, params, xs, ys, dim, chunk=512):
    """The trace of the Hessian as the sum of e_j.H e_j over all unit vectors (``dim`` Hessian-vector
    products in chunks): exact without storing the matrix."""
    eye = np.eye(chunk, dtype=models.real_dtype())
    total = 0.0
    for begin in range(0, dim, chunk):
        zs = np.zeros((chunk, dim), models.real_dtype())
        width = min(chunk, dim - begin)
        zs[:width, begin:begin + width] = eye[:width, :width]
        total += float(np.sum(hessian_forms(land, params, xs, ys, jnp.asarray(zs))))
    return total


def hessian_forms(land, params, xs, ys, zs):
    """:func:`quadratic_forms` through the engine's executor (one Hessian-vector product per row of ``zs``)."""
    return models.EXECUTOR.call(("forms", land), partial(quadratic_forms, land), (params, xs, ys, zs),
                                work=2 * len(zs) * len(ys))


def spectral_density(nodes, weights, grid, sigma):
    """Gaussian-broadened density of eigenvalues ``nodes`` with quadrature ``weights`` on ``grid``."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    kernel = np.exp(-((grid[:, None, None] - nodes[None]) ** 2) / (2 * sigma**2)) / np.sqrt(2 * np.pi * sigma**2)
    return np.mean(np.sum(kernel * weights[None], axis=2), axis=1)


def analyse(land, params, xs, ys, key, *, lanczos_steps=80, probes=100, top=5, trace="hutchinson"):
    """Trace, top eigenvalues and spectrum of the loss Hessian at ``params`` on ``(xs, ys)``.

    Exact when the dimension is at most ``EXACT_MAX_PARAMS``; otherwise Lanczos (top eigenvalues), SLQ
    (spectrum) and the trace by Hutchinson's estimator or, with ``trace="exact"``, :func:`exact_trace`.
    Returns a dict with ``method``, ``trace``, ``top_eigs``, ``nodes`` and ``weights``.
    """
    dim = land.loss(params, xs, ys)[1].shape[0]
    if dim <= EXACT_MAX_PARAMS:
        matrix = models.EXECUTOR.call(("hessian", land), partial(hessian_matrix, land), (params, xs, ys),
                                      work=2 * dim * len(ys))  # a Hessian-vector product: two passes
        eigs = np.linalg.eigvalsh(np.asarray(matrix))
        return {"method": "exact", "trace": float(eigs.sum()), "top_eigs": eigs[::-1][:top], "nodes": eigs[None],
                "weights": np.full((1, dim), 1.0 / dim)}
    dtype = models.real_dtype()
    k_top, k_slq, k_trace = jax.random.split(key, 3)
    starts = jnp.concatenate([jax.random.normal(k_top, (1, dim), dtype), rademacher(k_slq, probes, dim, dtype)])
    nodes, weights = quadrature(models.EXECUTOR.call(
        ("lanczos", land, lanczos_steps), lambda *a: lanczos_tridiagonals(land, *a, lanczos_steps),
        (params, xs, ys, starts), work=2 * len(starts) * lanczos_steps * len(ys)))
    if trace == "exact":
        trace = exact_trace(land, params, xs, ys, dim)
    else:
        trace = float(jnp.mean(hessian_forms(land, params, xs, ys, rademacher(k_trace, probes, dim, dtype))))
    return {"method": "lanczos", "trace": trace, "top_eigs": nodes[0, ::-1][:top], "nodes": nodes[1:],
            "weights": weights[1:]}


# ---------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class HessianRecipe:
    """How the Hessian study is run (fidelity item g): label flips, training recipes, loss, parameters, trace."""

    flips: str  # "balanced" (flip_labels) | "uniform" (int(n alpha) indices drawn uniformly, as the authors)
    training: dict  # model kind -> models.Recipe
    ce: dict  # model kind -> per-sample loss of the Hessian
    complex_qnn: bool  # QNN Hessian over [Re theta; Im theta]
    trace: str  # "exact" | "hutchinson" beyond EXACT_MAX_PARAMS
    ratio: str  # how plots.trace_ratios forms noisy / clean: "per_seed" | "mean_clean"


HESSIAN = {
    # src/plot_hessian.ipynb: unit-norm images, uniform flips, QNN mean probability CE with a shuffle buffer of
    # 2000, Keras MLP; Hessians of the mean loss (QNN: complex parameters; Keras MLP: clipped probabilities),
    # trace = sum of all eigenvalues; ratio to the mean clean trace, collapsed runs (trace 0.25 +- 0.01) dropped.
    "paper": HessianRecipe("uniform", {"qnn": models.Recipe(ce=models.probability_ce, adam_eps=1e-8, order="stream",
                                                             buffer=2000), "mlp": models.KERAS},
                           {"qnn": models.probability_ce, "mlp": models.keras_probability_ce}, True, "exact",
                           "mean_clean"),
    "corrected": HessianRecipe("balanced", {"qnn": models.ENGINE, "mlp": models.ENGINE},
                               {"qnn": models.bce, "mlp": models.bce}, False, "hutchinson", "per_seed"),
}


def uniform_flips(ys, alpha, rng):
    """The authors' Hessian-study poison: int(n alpha) labels flipped at indices drawn uniformly."""
    flipped = np.asarray(ys).copy()
    idx = rng.choice(len(flipped), int(len(flipped) * alpha + 1e-9), replace=False)
    flipped[idx] = 1 - flipped[idx]
    return flipped


FLIPS = {"balanced": lambda ys, alpha, rng: datar.flip_labels(ys, alpha, rng)[0], "uniform": uniform_flips}


def split_held_out(cfg, base_seed, seed, selection):
    """The paper's Hessian data: ``num_train`` unit-norm images (balanced), a seeded 70/30 train/held-out split."""
    xs, ys, _, _ = datar.mnist_data(cfg["num_train"], seed=base_seed, selection=selection, verbose=False)
    order = models.unit_rng(base_seed, "hessian-split", seed).permutation(len(ys))
    cut = int(round((1 - cfg["held_out"]) * len(ys)))
    return xs[order[:cut]], ys[order[:cut]], xs[order[cut:]], ys[order[cut:]]


def hessian_unit(settings, spec, *, chunk=None):
    """Train one model on every (alpha, seed) at once (complex128), then analyse each Hessian.

    ``spec`` names the model and may override the study's training schedule; ``chunk``: runs per program.
    Returns hessian.csv rows and the spectra (arrays by name, for ``hessian_spectra.npz``).
    """
    cfg, base = settings["hessian"], settings["seed"]
    fid = settings["fidelity"]
    recipe = HESSIAN[fid["hessian"]]
    kind = spec["model"]
    model = pu.build_model(kind, spec["arch"], datar.MNIST_DIM)
    cells = [(alpha, seed) for alpha in cfg["alphas"] for seed in cfg["seeds"]]
    splits = [split_held_out(cfg, base, seed, fid["mnist_selection"]) for _, seed in cells]
    flipped = [FLIPS[recipe.flips](split[1], alpha, models.unit_rng(base, "hessian-poison", seed, alpha))
               for split, (alpha, seed) in zip(splits, cells)]
    aux = {"x_held": model.prepare(np.stack([s[2] for s in splits])),
           "y_held": jnp.asarray(np.stack([s[3] for s in splits]))}
    out_cells = pu.train_cells(model, [(s[0], f) for s, f in zip(splits, flipped)],
                               pu.Schedule(**spec.get("schedule", cfg["schedule"])), recipe=recipe.training[kind],
                               seed=base, draws=[("hessian", kind, seed, alpha) for alpha, seed in cells],
                               shared={}, aux=aux, metrics=held_out_metrics, chunk=chunk)
    land = Landscape(model, recipe.ce[kind], recipe.complex_qnn and kind == "qnn")
    rows, spectra = [], {}
    for i, (alpha, seed) in enumerate(cells):
        n = cfg["samples"]
        result = analyse(land, jax.tree.map(lambda a: a[i], out_cells.params), aux["x_held"][i, :n],
                         aux["y_held"][i, :n], models.unit_key(base, "hessian-probes", seed, alpha),
                         lanczos_steps=cfg["lanczos_steps"], probes=cfg["probes"], trace=recipe.trace)
        name = f"{kind}_{spec['arch']}_alpha{alpha}_seed{seed}"
        spectra.update({f"{name}_nodes": result["nodes"], f"{name}_weights": result["weights"],
                        f"{name}_top": result["top_eigs"]})
        rows.append({"model": kind, "arch": spec["arch"], "alpha": alpha, "seed": seed,
                     "train_acc": pu.as_float(out_cells.metrics["train_acc"][i]),
                     "val_acc": pu.as_float(out_cells.metrics["val_acc"][i]),
                     "trace": float(result["trace"]), "top_eig": float(result["top_eigs"][0])})
    return rows, spectra


def held_out_metrics(model, params, data, aux, shared):
    return {"train_acc": models.accuracy(model, params, data["x"], data["y"]),
            "val_acc": models.accuracy(model, params, aux["x_held"], aux["y_held"])}
