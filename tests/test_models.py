"""Models and engine: circuit vs dense statevector, gradients, training, vmapped runs, Keras parity."""

from functools import reduce

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import models

I2 = np.eye(2)
X = np.array([[0, 1], [1, 0]], complex)
Y = np.array([[0, -1j], [1j, 0]])
Z = np.diag([1.0, -1.0])


def rotation(pauli, theta):
    return np.cos(theta / 2) * I2 - 1j * np.sin(theta / 2) * pauli


def on_qubit(mat, i, n):
    return reduce(np.kron, [mat if k == i else I2 for k in range(n)])


def dense_expectation(params, psi, ansatz):
    """<Z_{n-1}> from 2**n x 2**n matrices built from 2x2 gate matrices, one gate at a time."""
    n = params.shape[1]
    for theta in params:
        for i in range(n):
            gate = rotation(Y, theta[i, 1]) @ rotation(X, theta[i, 0])
            if ansatz == "rzz":
                gate = rotation(X, theta[i, 2]) @ gate
            psi = on_qubit(gate, i, n) @ psi
        for i in range(n):
            j = (i + 1) % n
            if ansatz == "rzz":
                zz = on_qubit(Z, i, n) @ on_qubit(Z, j, n)
                psi = (np.cos(theta[i, 3] / 2) * np.eye(2**n) - 1j * np.sin(theta[i, 3] / 2) * zz) @ psi
            else:
                p0, p1 = on_qubit(np.diag([1, 0]), i, n), on_qubit(np.diag([0, 1]), i, n)
                psi = (p0 + p1 @ on_qubit(X, j, n)) @ psi
    return np.real(np.vdot(psi, on_qubit(Z, n - 1, n) @ psi))


def random_states(rng, num, dim):
    psi = rng.normal(size=(num, dim)) + 1j * rng.normal(size=(num, dim))
    return psi / np.linalg.norm(psi, axis=1, keepdims=True)


@pytest.mark.parametrize("ansatz", ["rzz", "cnot"])
@pytest.mark.parametrize("dtype,tol", [("complex64", 2e-5), ("complex128", 1e-12)])
@pytest.mark.parametrize("n,group_size", [(5, 2), (6, 5), (4, 4)])
def test_qnn_matches_dense_statevector(ansatz, dtype, tol, n, group_size, rng, precision):
    precision(dtype)
    model = models.QNN(n, 3, ansatz, group_size=group_size)
    params = rng.normal(size=model.param_shape)
    psi = random_states(rng, 3, 2**n)
    got = np.asarray(model.apply(jnp.asarray(params, models.real_dtype()), model.prepare(psi)))
    want = 1 / (1 + np.exp(-5 * np.array([dense_expectation(params, p, ansatz) for p in psi])))
    np.testing.assert_allclose(got, want, atol=tol)


def test_qnn_init_shape_and_scale():
    params = models.QNN(10, 6).init(jax.random.PRNGKey(0))
    assert params.shape == (6, 10, 4) and params.dtype == jnp.float32
    assert 0.005 < float(jnp.std(params)) < 0.015


@pytest.mark.parametrize("model", [models.QNN(4, 2), models.MLP((5, 3), in_dim=32)], ids=["qnn", "mlp"])
def test_gradient_matches_finite_differences(model, rng, precision):
    precision("complex128")
    xs = model.prepare(random_states(rng, 6, 16))
    ys = jnp.asarray(rng.integers(0, 2, 6))
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape)), model.init(jax.random.PRNGKey(1)))

    def loss(p):
        return models.ce_loss(model, p, {"x": xs, "y": ys}, jnp.ones(6), None)

    grads = jax.grad(loss)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gflat = jax.flatten_util.ravel_pytree(grads)[0]
    for k in rng.choice(len(flat), 8, replace=False):
        e = jnp.zeros_like(flat).at[k].set(1e-6)
        fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / 2e-6
        assert float(gflat[k]) == pytest.approx(float(fd), abs=1e-7, rel=1e-5)


def split_keys(seed, num):
    return jax.random.split(jax.random.PRNGKey(seed), num)


def train(model, mnist, runs=2, epochs=3, batch=32, lr=0.03, seed=0):
    xs, ys, xv, yv = mnist
    x = model.prepare(xs)
    data = {"x": jnp.broadcast_to(x, (runs, *x.shape)), "y": jnp.broadcast_to(jnp.asarray(ys), (runs, len(ys)))}
    trainer = models.Trainer(model, epochs=epochs, batch_size=batch)
    params0 = models.init_runs(model, split_keys(seed, runs))
    keys = split_keys(seed + 100, runs)
    shared = {"x_val": model.prepare(xv), "y_val": jnp.asarray(yv)}
    return trainer, params0, data, keys, shared


def test_trained_qnn_separates_one_from_nine(mnist):
    trainer, params0, data, keys, shared = train(models.QNN(10, 4), mnist, runs=1, epochs=15, batch=16)
    _, metrics = models.train_runs(trainer, params0, data, keys, 0.05, shared=shared)
    assert metrics["val_acc"][0] >= 0.9


def test_trained_mlp_separates_one_from_nine(mnist):
    trainer, params0, data, keys, shared = train(models.MLP((64, 16)), mnist, runs=1, epochs=10, lr=0.005)
    _, metrics = models.train_runs(trainer, params0, data, keys, 0.005, shared=shared)
    assert metrics["val_acc"][0] >= 0.97
    assert metrics["train_acc"][0] == 1.0


def test_runs_together_equal_runs_one_by_one_and_compile_once(precision):
    precision("complex128")  # Adam turns float32 rounding in near-zero gradients into +-lr steps
    model = models.QNN(6, 2)
    rng = np.random.default_rng(0)
    small = (random_states(rng, 100, 64), rng.integers(0, 2, 100), random_states(rng, 20, 64), rng.integers(0, 2, 20))
    trainer, params0, data, keys, shared = train(model, small, runs=3, epochs=2, batch=48)
    before = models.TRACE_COUNT["fit"]
    together, m_all = models.train_runs(trainer, params0, data, keys, 0.05, shared=shared)
    chunked, m_chunk = models.train_runs(trainer, params0, data, keys, 0.05, shared=shared, chunk=2)
    for r in range(3):
        one = jax.tree.map(lambda a: a[r:r + 1], (params0, data, keys))
        alone, _ = models.train_runs(trainer, *one[:2], one[2], 0.05, shared=shared)
        np.testing.assert_allclose(alone[0], together[r], atol=1e-9)
    np.testing.assert_array_equal(m_all["val_acc"], m_chunk["val_acc"])
    # 100 samples in batches of 48 leave a partial last batch: still one shape per run count (3, 2, 1)
    assert models.TRACE_COUNT["fit"] - before == 3
    models.train_runs(trainer, params0, data, keys[::-1], 0.02, shared=shared)
    assert models.TRACE_COUNT["fit"] - before == 3


def test_same_key_same_parameters(mnist):
    trainer, params0, data, keys, shared = train(models.MLP((8,)), mnist, epochs=2)
    first, _ = models.train_runs(trainer, params0, data, keys, 0.01, shared=shared)
    again, _ = models.train_runs(trainer, params0, data, keys, 0.01, shared=shared)
    other, _ = models.train_runs(trainer, params0, data, keys[::-1], 0.01, shared=shared)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first[0]["w"][0], other[0]["w"][0])


def test_partial_last_batch_weighs_only_real_samples():
    idx, mask = models.batch_plan(jax.random.PRNGKey(0), 10, 4)
    assert idx.shape == (3, 4) and int(mask.sum()) == 10
    assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(range(10))


def test_mlp_is_the_papers_keras_mlp(rng):
    """Same outputs as Keras' Sequential with copied weights; one Adam step gives the same weights.

    optax adds epsilon after the bias correction, Keras before; at step 1 Keras' epsilon
    1e-7 * sqrt(1 - beta2) is exactly optax's 1e-7.
    """
    tf = pytest.importorskip("tensorflow")
    keras = tf.keras
    model = models.MLP((64, 16), in_dim=1024)
    params = model.init(jax.random.PRNGKey(3))
    xs = rng.random((32, 1024)).astype(np.float32)
    ys = rng.integers(0, 2, 32)
    net = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    net.set_weights([np.asarray(a) for layer in params for a in (layer["w"], layer["b"])])
    np.testing.assert_allclose(net(xs).numpy()[:, 0], model.apply(params, jnp.asarray(xs)), rtol=1e-5, atol=1e-6)

    lr = 0.005
    net.compile(optimizer=keras.optimizers.Adam(lr, epsilon=models.KERAS_EPS * np.sqrt(1 - 0.999)),
                loss="binary_crossentropy")
    keras_loss = net.train_on_batch(xs, ys.astype(np.float32))
    trainer = models.Trainer(model, epochs=1, batch_size=32)
    data = {"x": jnp.asarray(xs)[None], "y": jnp.asarray(ys)[None]}
    ours, _ = models.train_runs(trainer, jax.tree.map(lambda a: a[None], params), data,
                                split_keys(0, 1), lr, shared={"x_val": data["x"][0], "y_val": data["y"][0]})
    loss0 = models.bce(model.logits(params, jnp.asarray(xs)), jnp.asarray(ys))
    assert float(keras_loss) == pytest.approx(float(loss0), rel=1e-5)
    for got, want in zip([a[0] for layer in ours for a in (layer["w"], layer["b"])], net.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-2 * lr)  # float32 gradients differ in the last bits
