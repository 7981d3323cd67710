"""On a device: shot estimates, noise trajectories against a density-matrix simulator, the two shot gradients, and
the device settings on the command line."""

import functools
import itertools
import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import tensorcircuit as tc

import circuits
import fidelity
import models
import poison_unlearn as pu
import run_unlearn_mnist as mnist_script
import runner
import units


def random_states(rng, count, n):
    xs = rng.normal(size=(count, 2**n)) + 1j * rng.normal(size=(count, 2**n))
    return xs / np.linalg.norm(xs, axis=1, keepdims=True)


def device_qnn(qnn, **device):
    return models.DeviceQNN(qnn, models.Device(**device))


def measurements(model, params, xs, draws):
    """``draws`` independent measurements of every row (each a fresh salt of the rows' keys), (draws, rows)."""
    prepared = model.prepare(xs)
    salts = jnp.arange(draws, dtype=jnp.uint32)
    return np.asarray(jax.jit(jax.vmap(lambda s: model.logits(params, models.redraw(prepared, s))))(salts))


def test_shot_estimates_have_the_binomial_mean_and_variance(rng):
    qnn = models.QNN(4, 2)
    params = 0.5 * jax.random.normal(jax.random.PRNGKey(1), qnn.param_shape)
    xs = random_states(rng, 6, 4)
    exact = np.asarray(qnn.logits(params, qnn.prepare(xs))) / qnn.readout
    shots, draws = 100, 4000
    estimates = measurements(device_qnn(qnn, shots=shots), params, xs, draws) / qnn.readout
    variance = (1 - exact**2) / shots
    assert np.all(np.abs(estimates.mean(axis=0) - exact) < 4 * np.sqrt(variance / draws))
    np.testing.assert_allclose(estimates.var(axis=0), variance, rtol=0.12)  # 4000 draws: the variance to ~3%
    ones = (estimates + 1) * shots / 2  # an estimate is 2k/N - 1 for k of N shots
    np.testing.assert_allclose(ones, np.round(ones), atol=1e-3)
    scale = np.array([1.0, 4.0, 9.0, 16.0, 20.0, 25.0])  # unnormalised inputs (the columns encoding): the device
    scaled = measurements(device_qnn(qnn, shots=shots), params, xs * np.sqrt(scale)[:, None], draws) / qnn.readout
    assert np.all(np.abs(scaled.mean(axis=0) - scale * exact) < 4 * scale * np.sqrt(variance / draws))  # measures
    np.testing.assert_allclose(scaled.var(axis=0), scale**2 * variance, rtol=0.12)  # psi / ||psi||, rescaled


def test_readout_error_scales_the_expectation_exactly(rng):
    qnn = models.QNN(4, 3)
    params = 0.5 * jax.random.normal(jax.random.PRNGKey(2), qnn.param_shape)
    xs = random_states(rng, 5, 4)
    noisy = device_qnn(qnn, noise="r=0.1")
    np.testing.assert_allclose(noisy.logits(params, noisy.prepare(xs)), 0.8 * qnn.logits(params, qnn.prepare(xs)),
                               rtol=1e-6, atol=1e-7)


def test_noise_free_trajectories_give_exactly_the_noiseless_rows(mnist, precision):
    """A vanishing gate error (1e-30: no Pauli is ever drawn) runs every trajectory, redraw and measurement path
    of the engine, and must reproduce the exact statevector's resilience rows (in complex128, where the two
    programs' different rounding cannot move a prediction)."""
    precision("complex128")
    xs, ys, xs_val, ys_val = mnist
    ds = pu.Dataset("mnist", "none", xs[::3], ys[::3], xs_val[::3], ys_val[::3], raw_dim=784)  # both digits
    kwargs = dict(runs=1, schedule=pu.Schedule(2, 32, 0.05), seed=0)
    exact = pu.resilience_unit(ds, "qnn", "depth2", "label_flip", [0.0, 0.3], fid=fidelity.CORRECTED, **kwargs)
    silent = replace(fidelity.CORRECTED, device=models.Device(noise="p1=1e-30,p2=1e-30", trajectories=2))
    assert pu.model_for(ds, "qnn", "depth2", silent).device.gate_noise
    noisy = pu.resilience_unit(ds, "qnn", "depth2", "label_flip", [0.0, 0.3], fid=silent, **kwargs)
    assert pd.DataFrame(noisy).equals(pd.DataFrame(exact))  # NaN flip_fit at alpha 0 compares equal here
    zero = replace(fidelity.CORRECTED, device=models.Device(noise="p1=0,p2=0", trajectories=2))
    assert isinstance(pu.model_for(ds, "qnn", "depth2", zero), models.QNN)  # no noise: the exact statevector


def pauli_kraus(p, qubits):
    """Kraus operators of the depolarizing channel on ``qubits`` qubits as the Pauli mixture DeviceQNN samples."""
    paulis = [np.eye(2), np.array([[0, 1], [1, 0]]), np.array([[0, -1j], [1j, 0]]), np.diag([1.0, -1.0])]
    strings = [functools.reduce(np.kron, s) for s in itertools.product(paulis, repeat=qubits)]
    weights = [1 - p] + [p / (4**qubits - 1)] * (4**qubits - 1)
    return [tc.gates.Gate(np.sqrt(w) * s.reshape((2,) * 2 * qubits).astype(np.complex64))
            for w, s in zip(weights, strings)]


def density_matrix_expectation(params, psi, p1, p2):
    """<Z_{n-1}> of the noisy rzz circuit on TensorCircuit's density-matrix simulator: each qubit's rx, ry, rx, a
    depolarizing channel p1, the ring of rzz gates, then a two-qubit channel p2 on each bond."""
    n = int(np.log2(psi.shape[0]))
    c = tc.DMCircuit(n, inputs=psi)
    for theta in params:
        for q in range(n):
            c.rx(q, theta=theta[q, 0])
            c.ry(q, theta=theta[q, 1])
            c.rx(q, theta=theta[q, 2])
            c.apply_general_kraus(pauli_kraus(p1, 1), q)
        for q in range(n):
            c.rzz(q, (q + 1) % n, theta=theta[q, 3])
        for q in range(n):
            c.apply_general_kraus(pauli_kraus(p2, 2), q, (q + 1) % n)
    return jnp.real(c.expectation_ps(z=[n - 1]))


def test_noise_trajectories_match_the_density_matrix_simulator_in_value_and_gradient(rng):
    n, p1, p2, count = 3, 0.08, 0.15, 8192
    qnn = models.QNN(n, 2)
    model = device_qnn(qnn, noise=f"p1={p1},p2={p2}")
    params = 0.7 * jax.random.normal(jax.random.PRNGKey(3), qnn.param_shape)
    psi = jnp.asarray(random_states(rng, 1, n)[0], jnp.complex64)
    reference, reference_grad = jax.value_and_grad(density_matrix_expectation)(params, psi, p1, p2)
    keys = jax.random.split(jax.random.PRNGKey(4), count)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(model.trajectory), in_axes=(None, None, 0)))(params, psi, keys)
    assert abs(values.mean() - reference) < 4 * values.std() / np.sqrt(count)
    assert np.all(np.abs(grads.mean(axis=0) - reference_grad) < 4 * grads.std(axis=0) / np.sqrt(count) + 1e-6)
    assert abs(reference - qnn.expectation_z_last(params, psi)) > 0.02  # the noise matters at these levels


def test_the_shot_gradients_agree_with_the_exact_gradient_in_expectation(rng):
    qnn = models.QNN(3, 2)
    params = 0.6 * jax.random.normal(jax.random.PRNGKey(5), qnn.param_shape)
    xs = random_states(rng, 4, 3)
    exact = jax.grad(lambda p: qnn.logits(p, qnn.prepare(xs)).sum())(params)

    def gradients(model, draws):
        prepared = model.prepare(xs)
        grad = jax.grad(lambda p, s: model.logits(p, models.redraw(prepared, s)).sum())
        return np.asarray(jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, jnp.arange(draws, dtype=jnp.uint32)))

    shift_exact = gradients(device_qnn(qnn, noise="r=0.0", shot_grad="parameter_shift", shots=None), 1)[0]
    np.testing.assert_allclose(shift_exact, exact, atol=2e-5)  # without shots the shift rule is exact
    shifted = gradients(device_qnn(qnn, shots=200, shot_grad="parameter_shift"), 400)
    error = np.abs(shifted.mean(axis=0) - exact)
    assert np.all(error < 4 * shifted.std(axis=0) / np.sqrt(400) + 1e-6) and shifted.std(axis=0).min() > 0
    surrogate = gradients(device_qnn(qnn, shots=200), 3)
    np.testing.assert_allclose(surrogate, np.broadcast_to(exact, surrogate.shape), atol=2e-5)  # the expectation's


def test_device_settings_are_recorded_and_a_rerun_with_others_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    mnist_script.main(["--preset", "smoke", "--parts", "phase", "--runs", "1", "--shots", "50", "--noise", "r=0.02",
                       "--out", str(out)])
    device = json.loads((out / "config.json").read_text())["settings"]["device"]
    assert device | {"trajectories": 0} == {"noise": "r=0.02", "shots": 50, "shot_grad": "surrogate",
                                            "trajectories": 0}
    with pytest.raises(SystemExit) as stop:
        mnist_script.main(["--preset", "smoke", "--parts", "phase", "--runs", "1", "--shots", "100",
                           "--noise", "r=0.02", "--out", str(out)])
    assert stop.value.code == 2 and "device differ" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--shots", "0"], ["--shots", "many"], ["--noise", "p1=2"], ["--noise", "loud"],
                                  ["--noise", "p1=0.1,q=3"], ["--shot-grad", "finite"]])
def test_bad_device_settings_are_one_line_and_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        mnist_script.main(["--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "out").exists()


def qiskit_state(psi):
    """Our state (qubit 0 the most significant bit) in Qiskit's order (qubit 0 the least significant)."""
    n = int(np.log2(len(psi)))
    return np.asarray(psi).reshape((2,) * n).transpose(range(n - 1, -1, -1)).reshape(-1)


def test_an_exported_circuit_recomputes_the_qnn_outputs_in_qiskit(rng):
    from qiskit import qasm2
    from qiskit.quantum_info import Pauli, Statevector

    qnn = models.QNN(4, 3)
    params = 0.8 * jax.random.normal(jax.random.PRNGKey(6), qnn.param_shape)
    qasm = circuits.to_openqasm(qnn, params)
    assert circuits.PLACEHOLDER in qasm and qasm.count("rzz(") == 12 and "measure q[3]" in qasm
    circuit = qasm2.loads(qasm, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)  # qelib1.inc with rzz
    circuit = circuit.remove_final_measurements(inplace=False)
    xs = random_states(rng, 3, 4)
    z_last = Pauli("Z" + "I" * (qnn.n_qubits - 1))  # Qiskit's labels read from the last qubit to the first
    expectations = [Statevector(qiskit_state(x)).evolve(circuit).expectation_value(z_last).real for x in xs]
    with models.precision("complex128"):
        ours = qnn.apply(jnp.asarray(params, jnp.float64), qnn.prepare(xs))
    np.testing.assert_allclose(1 / (1 + np.exp(-qnn.readout * np.array(expectations))), ours, atol=1e-6)


def test_qiskit_aer_shot_estimates_agree_with_our_noise_trajectories(rng):
    """The same depolarizing channels (as Pauli errors after each rotation block and on each bond after the ring)
    and readout error in Qiskit Aer: its shot estimates and our trajectory estimates agree within 3 sigma."""
    from qiskit import QuantumCircuit, transpile
    from qiskit_aer import AerSimulator
    from qiskit_aer.noise import NoiseModel, ReadoutError, pauli_error

    n, p1, p2, r, shots, count = 6, 0.02, 0.05, 0.03, 20000, 4096
    qnn = models.QNN(n, 2)
    params = np.asarray(0.3 * jax.random.normal(jax.random.PRNGKey(7), qnn.param_shape), np.float64)
    single = pauli_error([("I", 1 - p1)] + [(p, p1 / 3) for p in "XYZ"])
    double = pauli_error([("II", 1 - p2)] + [(a + b, p2 / 15) for a in "IXYZ" for b in "IXYZ" if a + b != "II"])
    noise = NoiseModel()
    noise.add_readout_error(ReadoutError([[1 - r, r], [r, 1 - r]]), [n - 1])
    simulator = AerSimulator(noise_model=noise, seed_simulator=11)
    model = device_qnn(qnn, noise=f"p1={p1},p2={p2},r={r}", trajectories=count)
    states = random_states(rng, 3, n) + 2 * np.eye(2**n)[[0, 5, 40]]  # near basis states: |<Z>| well above 0
    for psi in states / np.linalg.norm(states, axis=1, keepdims=True):
        qc = QuantumCircuit(n, 1)
        qc.initialize(qiskit_state(psi))
        for layer in params:
            for q in range(n):
                qc.rx(layer[q, 0], q)
                qc.ry(layer[q, 1], q)
                qc.rx(layer[q, 2], q)
                qc.append(single.to_instruction(), [q])
            for q in range(n):
                qc.rzz(layer[q, 3], q, (q + 1) % n)
            for q in range(n):
                qc.append(double.to_instruction(), [q, (q + 1) % n])
        qc.measure(n - 1, 0)
        counts = simulator.run(transpile(qc, simulator), shots=shots).result().get_counts()
        aer = (counts.get("0", 0) - counts.get("1", 0)) / shots
        keys = jax.random.split(jax.random.PRNGKey(8), count)
        trajectories = (1 - 2 * r) * np.asarray(jax.vmap(model.trajectory, in_axes=(None, None, 0))(
            jnp.asarray(params, jnp.float32), jnp.asarray(psi, jnp.complex64), keys))
        sigma = np.sqrt((1 - aer**2) / shots + trajectories.var() / count)
        assert abs(aer - trajectories.mean()) < 3 * sigma
        exact = qnn.expectation_z_last(jnp.asarray(params, jnp.float32), jnp.asarray(psi, jnp.complex64))
        assert abs(trajectories.mean() - exact) > 3 * sigma  # the noise is resolved


def test_export_circuits_writes_each_qnn_teacher_as_openqasm(smoke_results):
    from qiskit import qasm2

    folder, _ = smoke_results
    files = sorted((folder / "mnist" / "circuits").glob("*.qasm"))
    assert [f.name for f in files] == ["qnn-depth2-plain-label_flip-alpha0.3-teacher0.qasm"]  # one shared teacher
    circuit = qasm2.loads(files[0].read_text(), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
    assert circuit.num_qubits == 10 and circuit.count_ops()["rzz"] == 20 and circuit.count_ops()["measure"] == 1
    assert not (folder / "xxz" / "circuits").exists()  # only when asked


def test_the_device_part_is_one_unit_per_grid_point_measured_on_its_device():
    args = runner.parse_args("", mnist_script.PRESETS, mnist_script.PARTS, ["--preset", "smoke", "--parts", "device"],
                             optional=mnist_script.OPTIONAL)
    assert args.parts == ["device_phase", "device_unlearn", "device_audit"]
    settings = runner.settings_for(args, mnist_script.PRESETS, dataset="mnist")
    ctx = units.Context(settings, mnist_script.load)
    keys = [u.key for u in units.PARTS["device_phase"].build_units(ctx)]
    assert keys == [{"dataset": "mnist", "noise": "none", "shots": "exact"},
                    {"dataset": "mnist", "noise": "device10", "shots": 100}]
    fid, columns = units.device_point(ctx, {"noise": "device10", "shots": 100})
    assert fid.device == models.Device("device10", shots=100, trajectories=settings["device"]["trajectories"])
    assert columns == {"noise": "device10", "shots": 100, "shot_grad": "surrogate"} and ctx.fid.device.exact
