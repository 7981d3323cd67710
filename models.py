"""The two models (TensorCircuit QNN, JAX MLP) and the one training engine both use.

Both models are frozen dataclasses with the same interface: ``init(key) -> params``,
``logits(params, xs)``, ``apply(params, xs) -> p(y=1|x)`` of shape ``(batch,)`` and ``prepare(xs)``
(NumPy data -> the model's input array). Everything downstream is written once against it.

The one global setting, made at import: TensorCircuit's JAX backend. Precision is process-wide, as
TensorCircuit keeps it: ``set_precision("complex64")`` (default; float32 parameters) or
``set_precision("complex128")`` (float64 parameters; TensorCircuit then switches JAX's 64-bit mode on).
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorcircuit as tc

import datar

tc.set_backend("jax")

KERAS_EPS = 1e-7  # Keras' Adam epsilon (optax applies it after bias correction, Keras before)
PRECISIONS = ("complex64", "complex128")


def set_precision(dtype):
    """Process-wide precision of circuits and parameters: 'complex64' or 'complex128'."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    tc.set_dtype(dtype)


def complex_dtype():
    return jnp.dtype(tc.dtypestr)


def real_dtype():
    return jnp.dtype(tc.rdtypestr)


# ------------------------------------------------------------------------------------- models
def qubit_groups(n, group_size):
    """Contiguous blocks of at most ``group_size`` qubits, as equal as possible."""
    k = -(-n // group_size)
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return tuple(tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]))


def ring_zz_signs(n):
    """(n, 2**n) table: eigenvalue of Z_i Z_{i+1 mod n} on each basis state (qubit 0 most significant)."""
    bits = (np.arange(2**n)[None, :] >> (n - 1 - np.arange(n))[:, None]) & 1
    z = 1 - 2 * bits
    return z * np.roll(z, -1, axis=0)


def kron_all(mats):
    return functools.reduce(jnp.kron, mats)


@dataclass(frozen=True)
class QNN:
    """The paper's quantum neural network on ``n_qubits`` with ``depth`` layers.

    ansatz "rzz" (the paper's classifier): each layer applies rx, ry, rx to every qubit, then
    rzz(theta) = exp(-i theta Z Z / 2) on every ring bond (i, i+1 mod n); params ``(depth, n, 4)``.
    ansatz "cnot" (the paper's Hessian study): rx, ry on every qubit, then CNOT(i, i+1 mod n) in order;
    params ``(depth, n, 2)``. Output p(y=1|x) = sigmoid(5 <Z_{n-1}>), input = amplitude-encoded state.

    Speed: each layer is one small TensorCircuit circuit, traced once and scanned over layers. The
    single-qubit rotations of a block of ``group_size`` qubits are merged into one gate (their
    Kronecker product), and the commuting rzz ring into one diagonal gate.
    """

    n_qubits: int
    depth: int
    ansatz: str = "rzz"
    group_size: int = 5

    def __post_init__(self):
        if self.ansatz not in ("rzz", "cnot"):
            raise ValueError(f"ansatz must be 'rzz' or 'cnot', got {self.ansatz!r}")

    @property
    def param_shape(self):
        return (self.depth, self.n_qubits, 4 if self.ansatz == "rzz" else 2)

    def init(self, key):
        return 0.01 * jax.random.normal(key, self.param_shape, real_dtype())

    def prepare(self, xs):
        return jnp.asarray(np.asarray(xs), dtype=complex_dtype())

    def _rotation(self, theta):
        """One qubit's gate: rx(theta[0]), then ry(theta[1]), then (rzz ansatz) rx(theta[2])."""
        u = tc.gates.ry(theta=theta[1]).tensor @ tc.gates.rx(theta=theta[0]).tensor
        return tc.gates.rx(theta=theta[2]).tensor @ u if self.ansatz == "rzz" else u

    def _layer(self, psi, theta):
        c = tc.Circuit(self.n_qubits, inputs=psi)
        rots = jax.vmap(self._rotation)(theta)
        for group in qubit_groups(self.n_qubits, self.group_size):
            c.any(*group, unitary=kron_all([rots[i] for i in group]))
        if self.ansatz == "rzz":
            phase = -0.5 * (theta[:, 3] @ jnp.asarray(ring_zz_signs(self.n_qubits), theta.dtype))
            c.diagonal(*range(self.n_qubits), diag=jnp.exp(1j * phase))
        else:
            for i in range(self.n_qubits):
                c.cnot(i, (i + 1) % self.n_qubits)
        return c.state(), None

    def expectation_z_last(self, params, psi):
        """<Z_{n-1}> of the circuit applied to one input state ``psi`` (length 2**n)."""
        psi, _ = jax.lax.scan(self._layer, psi, params)
        probs = jnp.abs(psi.reshape(-1, 2)) ** 2
        return jnp.sum(probs[:, 0] - probs[:, 1])

    def logits(self, params, xs):
        return 5.0 * jax.vmap(self.expectation_z_last, in_axes=(None, 0))(params, xs)

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


@dataclass(frozen=True)
class MLP:
    """Dense-ReLU stack and a sigmoid unit, initialised as Keras' Dense (Glorot-uniform, zero bias)."""

    hidden: tuple = (64, 16)
    in_dim: int = datar.MNIST_DIM

    @property
    def sizes(self):
        return (self.in_dim, *self.hidden, 1)

    def init(self, key):
        params = []
        for layer_key, (fan_in, fan_out) in zip(jax.random.split(key, len(self.sizes) - 1),
                                                zip(self.sizes[:-1], self.sizes[1:])):
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = jax.random.uniform(layer_key, (fan_in, fan_out), real_dtype(), -limit, limit)
            params.append({"w": w, "b": jnp.zeros(fan_out, real_dtype())})
        return params

    def prepare(self, xs):
        return jnp.asarray(datar.real_features(xs), dtype=real_dtype())

    def logits(self, params, xs):
        for layer in params[:-1]:
            xs = jax.nn.relu(xs @ layer["w"] + layer["b"])
        return (xs @ params[-1]["w"] + params[-1]["b"])[:, 0]

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


def param_count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------- losses, metrics
def masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def bce(logits, labels, mask=None):
    """Binary cross-entropy from logits (what Keras computes for a sigmoid output)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    return jnp.mean(losses) if mask is None else masked_mean(losses, mask)


def accuracy(model, params, xs, ys):
    return jnp.mean((model.logits(params, xs) > 0) == (ys > 0))


def ce_loss(model, params, batch, mask, aux):
    """Cross-entropy on the minibatch ``batch['x'], batch['y']``."""
    return bce(model.logits(params, batch["x"]), batch["y"], mask)


def fit_metrics(model, params, data, aux, shared):
    """Accuracy on the training data as trained, and on the clean validation set."""
    return {"train_acc": accuracy(model, params, data["x"], data["y"]),
            "val_acc": accuracy(model, params, shared["x_val"], shared["y_val"])}


# ------------------------------------------------------------------------------------- engine
def batch_plan(key, n, batch_size):
    """One epoch of shuffled minibatches with a fixed shape: (steps, batch) indices and a mask.

    The last batch is padded with masked-out entries, so a partial batch compiles nothing new and
    weighs exactly its real samples (as Keras' last, smaller batch).
    """
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = jnp.concatenate([jax.random.permutation(key, n), jnp.zeros(pad, dtype=jnp.int32)])
    mask = jnp.arange(steps * batch_size) < n
    return idx.reshape(steps, batch_size), mask.reshape(steps, batch_size)


@dataclass(frozen=True)
class Trainer:
    """What fixes a compiled training program: model, loss, metrics, epochs, batch size.

    ``loss(model, params, batch, mask, aux)`` sees a minibatch of the per-sample arrays in ``data``;
    ``metrics(model, params, data, aux, shared)`` returns a dict of scalars, recorded after the last
    epoch, or at epoch 0 and after every epoch with ``every_epoch``. Hashable: one compilation each.
    """

    model: object
    loss: object = ce_loss
    metrics: object = fit_metrics
    epochs: int = 10
    batch_size: int = 32
    every_epoch: bool = False


def fit(trainer, params, data, key, lr, aux, shared):
    """Adam on ``trainer.loss`` for ``trainer.epochs`` epochs; loops run inside the compiled program.

    Returns ``(params, metrics)``; metrics have a leading epoch axis (epochs + 1) with ``every_epoch``.
    """
    model = trainer.model
    n = jax.tree.leaves(data)[0].shape[0]
    opt = optax.adam(jnp.asarray(lr, jax.tree.leaves(params)[0].dtype), eps=KERAS_EPS)
    grad_fn = jax.grad(trainer.loss, argnums=1)

    def step(carry, plan):
        params, state = carry
        idx, mask = plan
        batch = jax.tree.map(lambda a: a[idx], data)
        updates, state = opt.update(grad_fn(model, params, batch, mask, aux), state, params)
        return (optax.apply_updates(params, updates), state), None

    def evaluate(params):
        return trainer.metrics(model, params, data, aux, shared)

    def epoch(carry, epoch_key):
        carry, _ = jax.lax.scan(step, carry, batch_plan(epoch_key, n, trainer.batch_size))
        return carry, (evaluate(carry[0]) if trainer.every_epoch else None)

    start = evaluate(params) if trainer.every_epoch else None
    (params, _), history = jax.lax.scan(epoch, (params, opt.init(params)),
                                        jax.random.split(key, trainer.epochs))
    if trainer.every_epoch:
        return params, jax.tree.map(lambda a, h: jnp.concatenate([a[None], h]), start, history)
    return params, evaluate(params)


TRACE_COUNT = {"fit": 0}  # incremented each time JAX traces the runs function (tests count compilations)


@functools.lru_cache(maxsize=None)
def compiled_runs(trainer):
    """``fit`` vmapped over independent runs (params, data, key, lr, aux) and jitted, once per trainer."""

    def runs(params, data, keys, lrs, aux, shared):
        TRACE_COUNT["fit"] += 1
        return jax.vmap(functools.partial(fit, trainer), in_axes=(0, 0, 0, 0, 0, None))(
            params, data, keys, lrs, aux, shared)

    return jax.jit(runs)


def take_runs(tree, idx):
    """Runs ``idx`` (an index array) of every array of a pytree with a leading run axis."""
    return jax.tree.map(lambda a: a[idx], tree)


def train_runs(trainer, params, data, keys, lr, aux=None, shared=None, chunk=None):
    """Train R independent runs at once; every per-run argument has a leading axis of length R.

    ``lr`` is a scalar or an (R,) array; ``shared`` (validation data) is the same for all runs.
    With ``chunk``, runs go through the compiled program ``chunk`` at a time (the last chunk is padded
    by repeating a run, so the shape, and hence the compilation, never changes).
    Returns ``(params, metrics)`` with leading axis R, as NumPy arrays.
    """
    num = len(keys)
    lrs = jnp.broadcast_to(jnp.asarray(lr, real_dtype()), (num,))
    aux = {} if aux is None else aux
    shared = {} if shared is None else shared
    chunk = num if chunk is None else min(chunk, num)
    out = []
    for start in range(0, num, chunk):
        idx = np.minimum(np.arange(start, start + chunk), num - 1)
        args = take_runs((params, data, jnp.asarray(keys), lrs, aux), idx)
        res = compiled_runs(trainer)(*args, shared)
        out.append(jax.tree.map(lambda a: np.asarray(a)[: min(chunk, num - start)], res))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def init_runs(model, keys):
    """Initial parameters of R runs, one key each."""
    return jax.vmap(model.init)(jnp.asarray(keys))


def unit_seed(seed, *identity):
    """A 63-bit integer derived deterministically from a seed and a unit's identity."""
    entropy = np.random.SeedSequence([seed, *[int.from_bytes(str(x).encode(), "little") % 2**63 for x in identity]])
    return int(entropy.generate_state(1, np.uint64)[0] >> np.uint64(1))
