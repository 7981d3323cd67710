"""The paper's QNN training step written with the tools researchers would otherwise use (``bench.py --peers``).

Each peer builds the same circuit (rx, ry, rx on every qubit, then rzz on every ring bond, ``depth`` layers, the
amplitude-encoded input, readout 5 <Z_{n-1}>), the same loss (mean binary cross-entropy from the logits) and the
same Adam step, checks its outputs (to 1e-5) and gradients (to 1e-4) against ours on a few samples, and reports its
compile time and steady-state sample-gradients per second. Optional packages, not in requirements.txt:

    pip install qujax pennylane pennylane-lightning
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import datar
import models

READOUT = 5.0


def problem(n, depth, batch, seed=0):
    """Our QNN, parameters away from the identity, unit-norm inputs and labels."""
    qnn = models.QNN(n, depth)
    rng = np.random.default_rng(seed)
    params = 0.5 * jax.random.normal(jax.random.PRNGKey(seed), qnn.param_shape)
    xs = datar.random_unit_vectors(batch, 2**n, rng).astype(np.complex64)
    return qnn, params, xs, rng.integers(0, 2, batch)


def bce_mean(expectations, ys):
    return jnp.mean(models.bce(READOUT * expectations, jnp.asarray(ys)))


def qujax_peer(n, depth):
    """qujax (JAX-native; angles in half-turns): ``(expectations(params, xs), loss_and_grad)`` jittable."""
    import qujax

    gates, qubits, slots = [], [], []
    for layer in range(depth):
        for q in range(n):
            for g, name in enumerate(("Rx", "Ry", "Rx")):
                gates.append(name), qubits.append([q]), slots.append([(layer * n + q) * 4 + g])
        for q in range(n):
            gates.append("ZZPhase"), qubits.append([q, (q + 1) % n]), slots.append([(layer * n + q) * 4 + 3])
    to_state = qujax.get_params_to_statetensor_func(gates, qubits, slots, n)
    to_z = qujax.get_statetensor_to_expectation_func([["Z"]], [[n - 1]], [1.0])

    def expectations(params, xs):
        angles = params.reshape(-1) / jnp.pi  # rx(theta) = Rx(theta / pi), rzz(theta) = ZZPhase(theta / pi)
        return jax.vmap(lambda x: to_z(to_state(angles, x.reshape((2,) * n))))(xs)

    return jax.jit(expectations), jax.jit(jax.value_and_grad(lambda p, xs, ys: bce_mean(expectations(p, xs), ys)))


def pennylane_circuit(qml, n, depth):
    def circuit(params, state):
        qml.StatePrep(state, wires=range(n))
        for layer in range(depth):
            for q in range(n):
                qml.RX(params[layer, q, 0], wires=q)
                qml.RY(params[layer, q, 1], wires=q)
                qml.RX(params[layer, q, 2], wires=q)
            for q in range(n):
                qml.IsingZZ(params[layer, q, 3], wires=[q, (q + 1) % n])
        return qml.expval(qml.PauliZ(n - 1))

    return circuit


def pennylane_jax_peer(n, depth):
    """PennyLane ``default.qubit``, JAX interface, backprop: ``jax.jit`` over ``jax.vmap`` of the QNode."""
    import pennylane as qml

    node = qml.QNode(pennylane_circuit(qml, n, depth), qml.device("default.qubit", wires=n), interface="jax",
                     diff_method="backprop")

    def expectations(params, xs):
        return jax.vmap(node, in_axes=(None, 0))(params, xs)

    return jax.jit(expectations), jax.jit(jax.value_and_grad(lambda p, xs, ys: bce_mean(expectations(p, xs), ys)))


def lightning_peer(n, depth):
    """PennyLane ``lightning.qubit`` with the adjoint method (its fastest CPU path): one tape per sample."""
    import pennylane as qml
    from pennylane import numpy as pnp

    node = qml.QNode(pennylane_circuit(qml, n, depth), qml.device("lightning.qubit", wires=n), interface="autograd",
                     diff_method="adjoint")

    def expectations(params, xs):
        return np.array([node(pnp.asarray(np.asarray(params, np.float64)), x) for x in np.asarray(xs)])

    def loss(params, xs, ys):
        logits = [READOUT * node(params, x) for x in np.asarray(xs)]
        return sum(pnp.logaddexp(0, z) - y * z for z, y in zip(logits, ys)) / len(ys)

    grad = qml.grad(loss, argnums=0)

    def loss_and_grad(params, xs, ys):
        p = pnp.asarray(np.asarray(params, np.float64), requires_grad=True)
        return float(loss(p, xs, ys)), np.asarray(grad(p, xs, np.asarray(ys)), np.float32)

    return expectations, loss_and_grad


PEERS = {"qujax": (qujax_peer, 256), "pennylane-default-jax": (pennylane_jax_peer, 256),
         "pennylane-lightning-adjoint": (lightning_peer, 16)}
"""Each peer and the batch it is timed at (lightning runs one tape per sample: a small batch keeps the window short)."""


def run_peer(name, n, depth, seconds):
    """Check one peer against our QNN and time its Adam step; returns a JSON-ready dict."""
    build, batch = PEERS[name]
    qnn, params, xs, ys = problem(n, depth, batch)
    start = time.perf_counter()
    expectations, loss_and_grad = build(n, depth)
    check = slice(0, 4)
    ours = np.asarray(qnn.logits(params, qnn.prepare(xs[check]))) / READOUT
    theirs = np.asarray(expectations(params, xs[check]))
    our_grad = jax.grad(lambda p: bce_mean(qnn.logits(p, qnn.prepare(xs[check])) / READOUT, ys[check]))(params)
    their_grad = np.asarray(loss_and_grad(params, xs[check], ys[check])[1])
    opt = optax.adam(0.005, eps=models.KERAS_EPS)
    state = opt.init(params)

    def step(params, state):
        _, grads = loss_and_grad(params, xs, ys)
        updates, state = opt.update(jnp.asarray(grads), state, params)
        return optax.apply_updates(params, updates), state

    jax.block_until_ready(step(params, state))  # the first call: compilation (or tape construction)
    compile_s = time.perf_counter() - start
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds or steps < 2:
        params, state = jax.block_until_ready(step(params, state))
        steps += 1
    rate = steps * batch / (time.perf_counter() - begin)
    return {"model": name, "qubits": n, "depth": depth, "batch": batch, "compile_s": round(compile_s, 2),
            "sample_grads_per_s": round(rate, 1), "max_abs_diff_vs_qnn": float(np.abs(theirs - ours).max()),
            "max_abs_grad_diff_vs_qnn": float(np.abs(their_grad - np.asarray(our_grad)).max()),
            "check": bool(np.allclose(theirs, ours, atol=1e-5) and np.allclose(their_grad, our_grad, atol=1e-4))}
