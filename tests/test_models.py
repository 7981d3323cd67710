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
            if ansatz in ("rzz", "noent"):
                gate = rotation(X, theta[i, 2]) @ gate
            psi = on_qubit(gate, i, n) @ psi
        for i in range(n if ansatz != "noent" else 0):  # noent: single-qubit gates alone
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


@pytest.mark.parametrize("ansatz", ["rzz", "cnot", "noent"])
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
def test_init_runs_draws_each_runs_own_key_as_a_vmapped_draw(model):
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    got = models.init_runs(model, list(keys))
    want = jax.vmap(model.init)(keys)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # equal up to the rounding of a vectorised draw
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-9)
    weights = np.asarray(max(jax.tree.leaves(got), key=np.size))
    assert not np.allclose(weights[0], weights[1])  # each run its own draw


@pytest.mark.parametrize("model", [models.QNN(4, 2), models.MLP((5, 3), in_dim=32)], ids=["qnn", "mlp"])
def test_gradient_matches_finite_differences(model, rng, precision):
    precision("complex128")
    xs = model.prepare(random_states(rng, 6, 16))
    ys = jnp.asarray(rng.integers(0, 2, 6))
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape)), model.init(jax.random.PRNGKey(1)))
    trainer = models.Trainer(model)

    def loss(p):
        return models.ce_loss(trainer, p, {"x": xs, "y": ys}, jnp.ones(6), None)

    grads = jax.grad(loss)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gflat = jax.flatten_util.ravel_pytree(grads)[0]
    for k in rng.choice(len(flat), 8, replace=False):
        e = jnp.zeros_like(flat).at[k].set(1e-6)
        fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / 2e-6
        assert float(gflat[k]) == pytest.approx(float(fd), abs=1e-7, rel=1e-5)


def plans(seed, runs, n, batch, epochs, recipe=models.ENGINE):
    rng = np.random.default_rng(seed)
    return models.stack_plans([recipe.plan(rng, n, batch, epochs) for _ in range(runs)])


def train(model, mnist, runs=2, epochs=3, batch=32, seed=0, recipe=models.ENGINE):
    xs, ys, xv, yv = mnist
    x = model.prepare(xs)
    data = {"x": jnp.broadcast_to(x, (runs, *x.shape)), "y": jnp.broadcast_to(jnp.asarray(ys), (runs, len(ys)))}
    trainer = models.Trainer(model, batch_size=batch, recipe=recipe)
    params0 = models.init_runs(model, jax.random.split(jax.random.PRNGKey(seed), runs))
    shared = {"x_val": model.prepare(xv), "y_val": jnp.asarray(yv)}
    return trainer, params0, data, plans(seed + 100, runs, len(ys), batch, epochs, recipe), shared


def test_trained_qnn_separates_one_from_nine(mnist):
    trainer, params0, data, plan, shared = train(models.QNN(10, 4), mnist, runs=1, epochs=15, batch=16)
    assert models.train_runs(trainer, params0, data, plan, 0.05, shared=shared).metrics["val_acc"][0] >= 0.9


def test_trained_mlp_separates_one_from_nine(mnist):
    trainer, params0, data, plan, shared = train(models.MLP((64, 16)), mnist, runs=1, epochs=10)
    metrics = models.train_runs(trainer, params0, data, plan, 0.005, shared=shared).metrics
    assert metrics["val_acc"][0] >= 0.97
    assert metrics["train_acc"][0] == 1.0


def test_runs_together_equal_runs_one_by_one_and_compile_once(precision):
    precision("complex128")  # Adam turns float32 rounding in near-zero gradients into +-lr steps
    model = models.QNN(6, 2)
    rng = np.random.default_rng(0)
    small = (random_states(rng, 100, 64), rng.integers(0, 2, 100), random_states(rng, 20, 64), rng.integers(0, 2, 20))
    trainer, params0, data, plan, shared = train(model, small, runs=3, epochs=2, batch=48)
    before = models.TRACE_COUNT["fit"]
    together = models.train_runs(trainer, params0, data, plan, 0.05, shared=shared)
    chunked = models.train_runs(trainer, params0, data, plan, 0.05, shared=shared, chunk=2)
    for r in range(3):
        one = jax.tree.map(lambda a: a[r:r + 1], (params0, data, plan))
        alone = models.train_runs(trainer, *one, 0.05, shared=shared)
        np.testing.assert_allclose(alone.params[0], together.params[r], atol=1e-9)
    np.testing.assert_array_equal(together.metrics["val_acc"], chunked.metrics["val_acc"])
    # 100 samples in batches of 48 leave a partial last batch: still one shape per run count (3, and 2 for the
    # chunks and the single runs, padded to two)
    assert models.TRACE_COUNT["fit"] - before == 2
    other = plans(7, 3, 100, 48, 2)
    models.train_runs(trainer, params0, data, other, np.array([0.02, 0.03, 0.04]), shared=shared)
    assert models.TRACE_COUNT["fit"] - before == 2  # new orders, new learning rates: no new compilation


def test_same_plan_same_parameters(mnist):
    trainer, params0, data, plan, shared = train(models.MLP((8,)), mnist, epochs=2)
    first = models.train_runs(trainer, params0, data, plan, 0.01, shared=shared).params
    again = models.train_runs(trainer, params0, data, plan, 0.01, shared=shared).params
    other = models.train_runs(trainer, params0, data, plans(5, 2, 200, 32, 2), 0.01, shared=shared).params
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first[0]["w"][0], other[0]["w"][0])


def test_partial_last_batch_weighs_only_real_samples():
    plan = models.epoch_plan(np.random.default_rng(0), 10, 4, epochs=2)
    assert plan["idx"].shape == (2, 3, 4) and plan["mask"].sum() == 20
    for epoch in range(2):
        assert sorted(plan["idx"][epoch][plan["mask"][epoch]].tolist()) == list(range(10))


class FixedDraws:
    """A stand-in generator: ``random`` returns the given numbers, ``permutation`` the identity."""

    def __init__(self, numbers):
        self.numbers = np.asarray(numbers)

    def random(self, size):
        return self.numbers[:size]

    def permutation(self, n):
        return np.arange(n)


def test_shuffle_buffer_stream_by_hand():
    # stream 0 1 2 3 4 0 1 2 3 4, buffer of 3: draw slot int(u * len(buffer)), refill it with the next element
    order = models.shuffle_buffer_order(FixedDraws([0.9, 0.0, 0.5, 0.4, 0.99] + [0.0] * 5), 5, 2, 3)
    # [0 1 2] -> 2, [0 1 3] -> 0, [4 1 3] -> 1, [4 0 3] -> 0, [4 1 3] -> 3, then slot 0 each time
    np.testing.assert_array_equal(order[:5], [2, 0, 1, 0, 3])
    assert sorted(order.tolist()) == sorted(np.tile(np.arange(5), 2).tolist())
    plan = models.stream_plan(np.random.default_rng(0), 5, 4, epochs=2, buffer=3)
    assert plan["idx"].shape == (1, 3, 4) and plan["mask"].sum() == 10  # ceil(10 / 4) steps, straddling epochs


def test_empty_step_changes_nothing():
    """A minibatch without real samples is a no-op for parameters and optimiser state (optional steps)."""
    model = models.MLP((3,), in_dim=4)
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(1, 8, 4)), jnp.float32), "y": jnp.asarray(rng.integers(0, 2, (1, 8)))}
    params = models.init_runs(model, jax.random.split(jax.random.PRNGKey(0), 1))
    plan = models.stack_plans([models.epoch_plan(rng, 8, 8, 3)])
    trainer = models.Trainer(model, batch_size=8)
    full = models.train_runs(trainer, params, data, plan, 0.1, shared={"x_val": data["x"][0], "y_val": data["y"][0]})
    gapped = {k: np.insert(v, 1, np.zeros_like(v[:, :1]), axis=1) for k, v in plan.items()}  # an empty epoch
    gapped["mask"][:, 1] = False
    later = models.train_runs(trainer, params, data, gapped, 0.1, shared={"x_val": data["x"][0], "y_val": data["y"][0]})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), full.params, later.params)


def test_a_plan_stopped_after_k_epochs_trains_as_k_epochs_and_a_subset_plan_draws_only_its_rows():
    model = models.MLP((3,), in_dim=4)
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(1, 8, 4)), jnp.float32), "y": jnp.asarray(rng.integers(0, 2, (1, 8)))}
    params = models.init_runs(model, jax.random.split(jax.random.PRNGKey(0), 1))
    shared = {"x_val": data["x"][0], "y_val": data["y"][0]}
    trainer = models.Trainer(model, batch_size=4)
    five = models.epoch_plan(np.random.default_rng(1), 8, 4, 5)
    two = models.epoch_plan(np.random.default_rng(1), 8, 4, 2)  # the same first two epochs
    stopped = models.train_runs(trainer, params, data, models.stack_plans([models.stop_after(five, 2)]), 0.1,
                                shared=shared)
    short = models.train_runs(trainer, params, data, models.stack_plans([two]), 0.1, shared=shared)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stopped.params, short.params)
    subset = models.subset_plan(np.random.default_rng(2), [1, 4, 6], 8, 4, 3)
    assert subset["idx"].shape == five["idx"][:3].shape  # the full set's shape, two steps per epoch
    assert set(subset["idx"][subset["mask"]]) == {1, 4, 6} and subset["mask"].sum() == 9
    own = models.subset_plan(np.random.default_rng(2), [1, 4, 6], 4, 4, 3)  # shaped for its own rows: one step
    assert own["idx"].shape == (3, 1, 4)
    padded, alone = (models.train_runs(trainer, params, data, models.stack_plans([p]), 0.1, shared=shared)
                     for p in (subset, own))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), padded.params, alone.params)


def test_runs_go_through_calls_of_one_width_that_pads_least(monkeypatch):
    widths, run = [], models.EXECUTOR.run
    monkeypatch.setattr(models.EXECUTOR, "run", lambda key, program, args, **kw: widths.append(len(args[0])) or
                        run(key, program, args, **kw))
    out, _, _ = models.map_runs("double", jax.jit(lambda x, common: 2 * x), (np.arange(5.0),), {}, chunk=4)
    assert widths == [3, 3] and out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]  # not 4 + (1 padded to 4)


def test_losses_and_divergences_by_hand():
    z, y = jnp.array([2.0, -1.0]), jnp.array([1, 1])
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0])))
    np.testing.assert_allclose(models.probability_ce(z, y), -np.log(p + 1e-14), rtol=1e-6)
    np.testing.assert_allclose(models.bce(z, y), -np.log(p), rtol=1e-6)
    q = 1 / (1 + np.exp(-0.5))
    np.testing.assert_allclose(models.one_sided_kl(jnp.array(2.0), jnp.array(0.5)),
                               p[0] * np.log((p[0] + 1e-14) / (q + 1e-14)), rtol=1e-6)
    full = p[0] * np.log(p[0] / q) + (1 - p[0]) * np.log((1 - p[0]) / (1 - q))
    np.testing.assert_allclose(models.bernoulli_kl(jnp.array(2.0), jnp.array(0.5)), full, rtol=1e-5)
    # Keras clips both probabilities to [1e-7, 1]: a saturated student costs at most p log(p / 1e-7)
    assert float(models.keras_kl(jnp.array(0.0), jnp.array(-40.0))) == pytest.approx(0.5 * np.log(0.5 / 1e-7), rel=1e-5)
    # the authors' QNN loss: a confidently wrong sample gets (almost) no gradient; BCE from logits still pulls it
    assert abs(float(jax.grad(lambda a: models.probability_ce(a, jnp.array(1))[()])(jnp.array(-60.0)))) < 1e-10
    assert float(jax.grad(lambda a: models.bce(a, jnp.array(1)))(jnp.array(-60.0))) == pytest.approx(-1.0)


def test_probability_ce_stays_finite_when_compiled_in_float32():
    """XLA may fold 1 - p + eps into (1 + eps) - p, which is 0 in float32 for a saturated sample: no NaN here."""
    z = jnp.array([-90.0, -30.0, 0.0, 30.0, 90.0], jnp.float32)
    for label in (0, 1):
        y = jnp.full(z.shape, label)
        loss = jax.jit(lambda a: models.probability_ce(a, y))(z)
        grad = jax.jit(jax.grad(lambda a: jnp.sum(models.probability_ce(a, y))))(z)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        np.testing.assert_allclose(loss, models.probability_ce(z, y), rtol=1e-6)


def test_summed_loss_recipe_takes_the_summed_gradient(mnist):
    """The authors' QNN batches sum their losses (TensorCircuit's vvag): with one Adam step and a tiny epsilon
    the step is sign-like either way, but the first moment differs by the batch size; check the loss itself."""
    model = models.MLP((4,), in_dim=1024)
    xs, ys = jnp.asarray(mnist[0][:16]), jnp.asarray(mnist[1][:16])
    params = model.init(jax.random.PRNGKey(0))
    summed = models.Trainer(model, recipe=models.Recipe(reduce=models.masked_sum))
    mean = models.Trainer(model)
    batch, mask = {"x": xs, "y": ys}, jnp.ones(16)
    assert float(models.ce_loss(summed, params, batch, mask, None)) == pytest.approx(
        16 * float(models.ce_loss(mean, params, batch, mask, None)), rel=1e-5)


def test_mlp_is_the_papers_keras_mlp(rng):
    """Same outputs as Keras' Sequential with copied weights; Keras' Adam (its default epsilon) from a fresh
    optimiser gives the same weights step for step over 60 steps, where optax's Adam drifts away."""
    tf = pytest.importorskip("tensorflow")
    keras = tf.keras
    model = models.MLP((16, 4), in_dim=64)
    params = model.init(jax.random.PRNGKey(3))
    xs = rng.random((32, 64)).astype(np.float32)
    ys = rng.integers(0, 2, 32)
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    net.set_weights([np.asarray(a) for layer in params for a in (layer["w"], layer["b"])])
    np.testing.assert_allclose(net(xs).numpy()[:, 0], model.apply(params, jnp.asarray(xs)), rtol=1e-5, atol=1e-6)

    lr, steps, checks = 0.01, 60, (1, 2, 10, 60)
    net.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")  # Keras' default epsilon, 1e-7
    full = models.ENGINE.plan(np.random.default_rng(0), 32, 32, steps)  # one step per epoch

    def ours(recipe, stops):
        """Weights after each of ``stops`` steps: one run per stop, in one program (a stopped plan's empty steps
        change nothing)."""
        runs = len(stops)
        data = {"x": jnp.broadcast_to(jnp.asarray(xs), (runs, *xs.shape)), "y": jnp.broadcast_to(ys, (runs, 32))}
        out = models.train_runs(models.Trainer(model, batch_size=32, recipe=recipe),
                                jax.tree.map(lambda a: jnp.stack([a] * runs), params), data,
                                models.stack_plans([models.stop_after(full, k) for k in stops]), lr,
                                shared={"x_val": jnp.asarray(xs), "y_val": jnp.asarray(ys)}).params
        return [[np.asarray(a[run]) for layer in out for a in (layer["w"], layer["b"])] for run in range(runs)]

    keras_weights = {}
    for step in range(1, steps + 1):
        net.train_on_batch(xs, ys.astype(np.float32))
        keras_weights[step] = net.get_weights()
    for step, weights in zip(checks, ours(models.KERAS, checks)):
        for got, want in zip(weights, keras_weights[step]):
            np.testing.assert_allclose(got, want, atol=2e-6 * step)  # float32 gradients differ in the last bits
    [engine] = ours(models.ENGINE, [steps])
    drift = max(np.abs(a - b).max() for a, b in zip(engine, keras_weights[steps]))
    assert drift > 1e-4  # optax's epsilon is applied after the bias correction: not Keras' Adam


def test_keras_adam_is_optax_adam_with_a_bias_corrected_epsilon(precision):
    """Keras' update lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps) equals optax's Adam whose epsilon is
    eps / sqrt(1 - b2^t) at each step t (checked on a sequence of gradients, float64)."""
    precision("complex128")
    grads = np.random.default_rng(0).normal(scale=1e-6, size=(50, 3))
    keras, state = models.keras_adam(0.01, 1e-7), None
    state = keras.init(jnp.zeros(3))
    m = v = np.zeros(3)
    for t, g in enumerate(grads, start=1):
        update, state = keras.update(jnp.asarray(g), state)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        optax_form = -0.01 * m_hat / (np.sqrt(v_hat) + 1e-7 / np.sqrt(1 - 0.999**t))
        np.testing.assert_allclose(update, optax_form, rtol=1e-10)


def test_benchs_yardsticks_compute_the_qnns_circuit(rng, precision):
    """bench.py times the QNN step beside two plain-JAX formulations of its circuit: both must give the dense
    statevector's outputs and the QNN's gradient (5 qubits: unequal halves)."""
    import bench

    precision("complex128")
    n = 5
    model = models.QNN(n, 3)
    params = jnp.asarray(rng.normal(size=model.param_shape))
    psi = random_states(rng, 4, 2**n)
    xs = model.prepare(psi)
    want = 5 * np.array([dense_expectation(np.asarray(params), p, "rzz") for p in psi])

    def grad(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.logits(p, xs)))))(params)

    for yardstick in bench.YARDSTICKS.values():
        np.testing.assert_allclose(jax.jit(yardstick(n, 3).logits)(params, xs), want, atol=1e-11)
        np.testing.assert_allclose(grad(yardstick(n, 3)), grad(model), atol=1e-10)
