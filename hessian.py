"""Loss-landscape analysis: Hessian-vector products, exact spectra, Lanczos, SLQ and Hutchinson.

The Hessian is taken with respect to all parameters (flattened), of the mean cross-entropy on a fixed
set of samples. Exact ``jax.hessian`` + ``eigvalsh`` where the parameter count allows; otherwise
Lanczos with full reorthogonalisation (top eigenvalues), stochastic Lanczos quadrature (spectral
density) and Hutchinson's estimator (trace), all built on Hessian-vector products.
"""

import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import datar
import models
import poison_unlearn as pu

EXACT_MAX_PARAMS = 2000


def flat_loss(model, params, xs, ys):
    """The loss as a function of one flat parameter vector, and that vector."""
    flat, unravel = ravel_pytree(params)
    return (lambda w: models.bce(model.logits(unravel(w), xs), ys)), flat


def hvp(loss, w, v):
    """Hessian-vector product H(w) v by forward-over-reverse differentiation."""
    return jax.jvp(jax.grad(loss), (w,), (v,))[1]


def exact_hessian(loss, w):
    return jax.hessian(loss)(w)


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


def model_hvp(model, params, xs, ys):
    loss, w = flat_loss(model, params, xs, ys)
    return partial(hvp, loss, w), w


@partial(jax.jit, static_argnums=0)
def hessian_matrix(model, params, xs, ys):
    """The exact Hessian of the loss with respect to the flattened parameters."""
    loss, w = flat_loss(model, params, xs, ys)
    return exact_hessian(loss, w)


@partial(jax.jit, static_argnums=(0, 5))
def lanczos_tridiagonals(model, params, xs, ys, starts, steps):
    """Lanczos on the loss Hessian from each row of ``starts``, compiled once per model and shape."""
    matvec, _ = model_hvp(model, params, xs, ys)
    return jax.vmap(lambda v: lanczos(matvec, v, steps))(starts)


@partial(jax.jit, static_argnums=0)
def quadratic_forms(model, params, xs, ys, zs):
    """z.H z for each row z of ``zs``: their mean over Rademacher vectors is Hutchinson's trace estimate."""
    matvec, _ = model_hvp(model, params, xs, ys)
    return jnp.sum(zs * jax.vmap(matvec)(zs), axis=1)


def spectral_density(nodes, weights, grid, sigma):
    """Gaussian-broadened density of eigenvalues ``nodes`` with quadrature ``weights`` on ``grid``."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    kernel = np.exp(-((grid[:, None, None] - nodes[None]) ** 2) / (2 * sigma**2)) / np.sqrt(2 * np.pi * sigma**2)
    return np.mean(np.sum(kernel * weights[None], axis=2), axis=1)


def analyse(model, params, xs, ys, key, lanczos_steps=80, probes=100, top=5):
    """Trace, top eigenvalues and spectrum of the loss Hessian at ``params`` on ``(xs, ys)``.

    Exact when the parameter count is at most ``EXACT_MAX_PARAMS``; otherwise Lanczos (top
    eigenvalues), Hutchinson (trace) and SLQ (spectrum). Returns a dict with ``method``, ``trace``,
    ``top_eigs``, ``nodes`` and ``weights``.
    """
    dim = models.param_count(params)
    if dim <= EXACT_MAX_PARAMS:
        eigs = np.linalg.eigvalsh(np.asarray(hessian_matrix(model, params, xs, ys)))
        return {"method": "exact", "trace": float(eigs.sum()), "top_eigs": eigs[::-1][:top], "nodes": eigs[None],
                "weights": np.full((1, dim), 1.0 / dim)}
    dtype = models.real_dtype()
    k_top, k_slq, k_trace = jax.random.split(key, 3)
    starts = jnp.concatenate([jax.random.normal(k_top, (1, dim), dtype), rademacher(k_slq, probes, dim, dtype)])
    nodes, weights = quadrature(lanczos_tridiagonals(model, params, xs, ys, starts, lanczos_steps))
    trace = float(jnp.mean(quadratic_forms(model, params, xs, ys, rademacher(k_trace, probes, dim, dtype))))
    return {"method": "lanczos", "trace": trace, "top_eigs": nodes[0, ::-1][:top], "nodes": nodes[1:],
            "weights": weights[1:]}


# ---------------------------------------------------------------------------------- the study
def split_held_out(cfg, base_seed, seed):
    """The paper's Hessian data: ``num_train`` images (balanced), a seeded 70/30 train/held-out split."""
    xs, ys, _, _ = datar.mnist_data(cfg["num_train"], seed=base_seed, verbose=False)
    order = np.random.default_rng(models.unit_seed(base_seed, "hessian-split", seed)).permutation(len(ys))
    cut = int(round((1 - cfg["held_out"]) * len(ys)))
    return xs[order[:cut]], ys[order[:cut]], xs[order[cut:]], ys[order[cut:]]


def hessian_unit(settings, spec, out):
    """Train one model on every (alpha, seed) at once (complex128), then analyse each Hessian.

    ``spec`` names the model and may override the study's training schedule.
    Returns hessian.csv rows; the spectra go into ``out/hessian_spectra.npz``.
    """
    cfg, base = settings["hessian"], settings["seed"]
    model = pu.build_model(spec["model"], spec["arch"], datar.MNIST_DIM)
    cells = [(alpha, seed) for alpha in cfg["alphas"] for seed in cfg["seeds"]]
    splits = [split_held_out(cfg, base, seed) for _, seed in cells]
    flipped = [datar.flip_labels(split[1], alpha, np.random.default_rng(
        models.unit_seed(base, "hessian-poison", seed, alpha)))[0] for split, (alpha, seed) in zip(splits, cells)]
    data = {"x": model.prepare(pu.stacked(splits, 0)), "y": jnp.asarray(np.stack(flipped))}
    aux = {"x_held": model.prepare(pu.stacked(splits, 2)), "y_held": jnp.asarray(pu.stacked(splits, 3))}
    params0 = models.init_runs(model, jnp.stack([pu.prng_key(base, "hessian-init", spec["model"], seed)
                                                 for _, seed in cells]))
    keys = jnp.stack([pu.prng_key(base, "hessian-shuffle", spec["model"], seed, alpha) for alpha, seed in cells])
    epochs, batch, lr = spec.get("schedule", cfg["schedule"])
    trainer = models.Trainer(model, metrics=held_out_metrics, epochs=epochs, batch_size=batch)
    params, metrics = models.train_runs(trainer, params0, data, keys, lr, aux)
    rows, spectra = [], {}
    for i, (alpha, seed) in enumerate(cells):
        n = cfg["samples"]
        result = analyse(model, jax.tree.map(lambda a: a[i], params), aux["x_held"][i, :n], aux["y_held"][i, :n],
                         pu.prng_key(base, "hessian-probes", seed, alpha), cfg["lanczos_steps"], cfg["probes"])
        name = f"{spec['model']}_{spec['arch']}_alpha{alpha}_seed{seed}"
        spectra.update({f"{name}_nodes": result["nodes"], f"{name}_weights": result["weights"],
                        f"{name}_top": result["top_eigs"]})
        rows.append({"model": spec["model"], "arch": spec["arch"], "alpha": alpha, "seed": seed,
                     "train_acc": pu.as_float(metrics["train_acc"][i]), "val_acc": pu.as_float(metrics["val_acc"][i]),
                     "trace": float(result["trace"]), "top_eig": float(result["top_eigs"][0])})
    save_spectra(Path(out) / "hessian_spectra.npz", spectra)
    return rows


def held_out_metrics(model, params, data, aux, shared):
    return {"train_acc": models.accuracy(model, params, data["x"], data["y"]),
            "val_acc": models.accuracy(model, params, aux["x_held"], aux["y_held"])}


def save_spectra(path, new):
    """Add arrays to an npz file atomically (write a copy, then rename)."""
    old = dict(np.load(path)) if path.exists() else {}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **old, **new)
    os.replace(tmp, path)


def _unit(ctx, spec):
    previous = str(models.complex_dtype())
    models.set_precision("complex128")
    try:
        rows = hessian_unit(ctx.settings, spec, ctx.out)
    finally:
        models.set_precision(previous)
    return rows, "trace by alpha " + pu.mean_by(rows, "alpha", "trace")


def hessian_units(ctx):
    """One unit per model of the Hessian study."""
    return [({"model": spec["model"], "arch": spec["arch"]}, f"{spec['model']} {spec['arch']}",
             partial(_unit, ctx, spec)) for spec in ctx.settings["hessian"]["models"]]
