"""The two models (TensorCircuit QNN, JAX MLP) and the one training engine both use.

Both models are frozen dataclasses with the same interface: ``init(key) -> params``,
``logits(params, xs)``, ``apply(params, xs) -> p(y=1|x)`` of shape ``(batch,)`` and ``prepare(xs)``
(NumPy data -> the model's input array). Everything downstream is written once against it.

The one global setting, made at import: TensorCircuit's JAX backend. Precision is process-wide, as
TensorCircuit keeps it: ``set_precision("complex64")`` (default; float32 parameters) or
``set_precision("complex128")`` (float64 parameters; TensorCircuit then switches JAX's 64-bit mode on), or for
one block ``with precision(dtype):``.
"""

import contextlib
import ctypes
import functools
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, which jaxlib's LAPACK kernels call: see one_blas_thread)
import tensorcircuit as tc
import threadpoolctl

import datar

tc.set_backend("jax")

KERAS_EPS = 1e-7  # Keras' Adam epsilon (optax applies it after bias correction, Keras before)
ADAM_B1, ADAM_B2 = 0.9, 0.999
PRECISIONS = ("complex64", "complex128")


def keep_freed_memory():
    """Make glibc keep freed memory in the process: no mmap for large blocks, no trimming, one arena.

    XLA:CPU allocates a temporary buffer per execution (about 50 MB for a 10-qubit QNN step); glibc serves such
    blocks with mmap and unmaps them on free, so every step page-faults all of it anew. Keeping the memory made
    the QNN step 1.4-2x faster on a 2-core KVM guest. Process-wide, so the command-line entry points call it
    (not an import). Returns False where there is no glibc (macOS, Windows, musl), which changes nothing else.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(libc.mallopt(option, value) == 1
               for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_arena_max, 1)))


def one_blas_thread():
    """Run the host's BLAS and LAPACK on one thread: OpenBLAS under NumPy, SciPy and scikit-learn, which is also
    what jaxlib's CPU kernels for Cholesky factors, triangular solves and eigendecompositions call. XLA's own
    thread pool does the parallel work; OpenBLAS's threads, which spin while they wait for work, otherwise compete
    with it for the cores. On a 2-core KVM guest one thread made a training of the unitary observable (a 512 x 512
    Cholesky factor per step) 1.6-1.8x faster and the cross-validated linear control 3.7x faster. Process-wide, so
    the command-line entry points call it (not an import); a BLAS loaded later keeps its own setting."""
    threadpoolctl.threadpool_limits(1, user_api="blas")


def cache_compilations(folder=None):
    """Keep compiled programs on disk (JAX's persistent compilation cache, default ``$QMU_CACHE/jax``): a rerun,
    a resumed run or a notebook re-running a script skips most compilation. Entries are keyed by the program
    and the library versions, so a stale entry is never used. Process-wide: called by the entry points."""
    jax.config.update("jax_compilation_cache_dir", str(folder or datar.CACHE_DIR / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def set_precision(dtype):
    """Process-wide precision of circuits and parameters: 'complex64' or 'complex128'."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    tc.set_dtype(dtype)


_PRECISION = threading.Condition()
_HELD = {"dtype": None, "threads": 0, "previous": None}  # the precision of the blocks now open, how many, and before


@contextlib.contextmanager
def precision(dtype):
    """Circuits and parameters in ``dtype`` inside the block, the process's previous precision after it. The
    precision is the process's: threads in blocks of the same precision run together (the Hessian part's units),
    and a block of another precision waits until they have all left."""
    with _PRECISION:
        _PRECISION.wait_for(lambda: _HELD["threads"] == 0 or _HELD["dtype"] == dtype)
        if _HELD["threads"] == 0:
            _HELD.update(dtype=dtype, previous=str(complex_dtype()))
            set_precision(dtype)
        _HELD["threads"] += 1
    try:
        yield
    finally:
        with _PRECISION:
            _HELD["threads"] -= 1
            if _HELD["threads"] == 0:
                set_precision(_HELD["previous"])
                _PRECISION.notify_all()


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


def basis_bits(n):
    """(n, 2**n) table: bit of qubit i in each basis state (qubit 0 most significant)."""
    return (np.arange(2**n)[None, :] >> (n - 1 - np.arange(n))[:, None]) & 1


def ring_zz_signs(n):
    """(n, 2**n) table: eigenvalue of Z_i Z_{i+1 mod n} on each basis state."""
    z = 1 - 2 * basis_bits(n)
    return z * np.roll(z, -1, axis=0)


@functools.cache
def cnot_ring_sources(n):
    """The CNOT ring CNOT(0, 1), CNOT(1, 2), ..., CNOT(n-1, 0) in that order as a gather: it maps each basis state
    |b> to one basis state |f(b)> (a CNOT sets b_j ^= b_i), so the ring's output amplitudes are
    ``psi[cnot_ring_sources(n)]``, the sources f^-1 of each basis state."""
    bits = basis_bits(n)
    for i in range(n):
        bits[(i + 1) % n] ^= bits[i]
    image = (bits << (n - 1 - np.arange(n))[:, None]).sum(axis=0)
    return np.argsort(image)


def kron_all(mats):
    return functools.reduce(jnp.kron, mats)


ANSATZ_ANGLES = {"rzz": 4, "cnot": 2, "noent": 3}  # angles per qubit and layer


@dataclass(frozen=True)
class QNN:
    """The paper's quantum neural network on ``n_qubits`` with ``depth`` layers.

    ansatz "rzz" (the paper's classifier): each layer applies rx, ry, rx to every qubit, then
    rzz(theta) = exp(-i theta Z Z / 2) on every ring bond (i, i+1 mod n); params ``(depth, n, 4)``.
    ansatz "cnot" (the paper's Hessian study): rx, ry on every qubit, then CNOT(i, i+1 mod n) in order;
    params ``(depth, n, 2)``. ansatz "noent" (an ablation): the rzz layers' rotations without the ring, a product
    circuit with no entanglement; params ``(depth, n, 3)``. Output p(y=1|x) = sigmoid(readout <Z_{n-1}>) (the
    paper's readout 5), input = amplitude-encoded state.

    Speed: each layer is one small TensorCircuit circuit, traced once and scanned over layers (the scan is
    unrolled by XLA, which lets it fuse across layers). The single-qubit rotations of a block of
    ``group_size`` qubits are merged into one gate (their Kronecker product, a 2**group_size matrix), and the
    commuting rzz ring into one diagonal gate.
    """

    n_qubits: int
    depth: int
    ansatz: str = "rzz"
    group_size: int = 4
    readout: float = 5.0
    precision: str | None = None  # the parameters' real dtype (None: the process's, set by --dtype)

    def __post_init__(self):
        if self.ansatz not in ANSATZ_ANGLES:
            raise ValueError(f"ansatz must be one of {', '.join(ANSATZ_ANGLES)}, got {self.ansatz!r}")

    @property
    def param_shape(self):
        return (self.depth, self.n_qubits, ANSATZ_ANGLES[self.ansatz])

    def init(self, key):
        return 0.01 * jax.random.normal(key, self.param_shape, self.precision or real_dtype())

    def prepare(self, xs):
        return jnp.asarray(np.asarray(xs), dtype=complex_dtype())

    def _rotation(self, theta):
        """One qubit's gate: rx(theta[0]), then ry(theta[1]), then (rzz ansatz) rx(theta[2])."""
        u = tc.gates.ry(theta=theta[1]).tensor @ tc.gates.rx(theta=theta[0]).tensor
        return u if self.ansatz == "cnot" else tc.gates.rx(theta=theta[2]).tensor @ u

    def _layer(self, psi, theta):
        return self.apply_layer(psi, self.rotation_gates(theta), theta), None

    def apply_layer(self, psi, rots, theta):
        """One layer on the state ``psi``: the single-qubit gates ``rots`` (n, 2, 2), then the entangler of ``theta``."""
        c = tc.Circuit(self.n_qubits, inputs=psi)
        for group in qubit_groups(self.n_qubits, self.group_size):
            c.any(*group, unitary=kron_all([rots[i] for i in group]))
        if self.ansatz == "rzz":
            phase = -0.5 * (theta[:, 3] @ jnp.asarray(ring_zz_signs(self.n_qubits), theta.dtype))
            c.diagonal(*range(self.n_qubits), diag=jnp.exp(1j * phase))
        elif self.ansatz == "cnot":  # a permutation of the amplitudes: one gather, not ten contractions and transposes
            return c.state()[cnot_ring_sources(self.n_qubits)]
        return c.state()

    def expectation_z_last(self, params, psi):
        """<Z_{n-1}> of the circuit applied to one input state ``psi`` (length 2**n)."""
        psi, _ = jax.lax.scan(self._layer, psi, params, unroll=True)  # one layer traced, unrolled by XLA
        return z_last(psi)

    def logits(self, params, xs):
        return self.readout * jax.vmap(self.expectation_z_last, in_axes=(None, 0))(params, xs)

    def rotation_gates(self, theta):
        """Each qubit's single-qubit gate of a layer, (n, 2, 2)."""
        return jax.vmap(self._rotation)(theta)

    def layers_from_output(self, params):
        """Each parameter's circuit layer counted from the output (0 = the last layer), shaped like ``params``."""
        return jnp.broadcast_to(jnp.arange(self.depth)[::-1, None, None], params.shape)

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


def z_last(psi):
    """<Z> of the last qubit (the least significant bit) in the state ``psi``."""
    probs = jnp.abs(psi.reshape(-1, 2)) ** 2
    return jnp.sum(probs[:, 0] - probs[:, 1])


@dataclass(frozen=True)
class MLP:
    """Dense-ReLU stack and a sigmoid unit, initialised as Keras' Dense (Glorot-uniform, zero bias).

    ``precision``: the real dtype of parameters and features (``None``: the process's, set by ``--dtype``).
    """

    hidden: tuple = (64, 16)
    in_dim: int = datar.MNIST_DIM
    precision: str | None = None

    @property
    def dtype(self):
        return jnp.dtype(self.precision) if self.precision else real_dtype()

    @property
    def sizes(self):
        return (self.in_dim, *self.hidden, 1)

    def init(self, key):
        params = []
        for layer_key, (fan_in, fan_out) in zip(jax.random.split(key, len(self.sizes) - 1),
                                                zip(self.sizes[:-1], self.sizes[1:])):
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = jax.random.uniform(layer_key, (fan_in, fan_out), self.dtype, -limit, limit)
            params.append({"w": w, "b": jnp.zeros(fan_out, self.dtype)})
        return params

    def prepare(self, xs):
        return jnp.asarray(datar.real_features(xs), dtype=self.dtype)

    def layers_from_output(self, params):
        """Each parameter's Dense layer counted from the output (0 = the sigmoid unit), shaped like ``params``."""
        return [jax.tree.map(lambda a, k=len(params) - 1 - i: jnp.full(a.shape, k), layer)
                for i, layer in enumerate(params)]

    def logits(self, params, xs):
        for layer in params[:-1]:
            xs = jax.nn.relu(xs @ layer["w"] + layer["b"])
        return (xs @ params[-1]["w"] + params[-1]["b"])[:, 0]

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


@dataclass(frozen=True)
class DiagonalObservable:
    """A bounded observable diagonal in the computational basis: logit = readout * sum_k tanh(v_k) |psi_k|^2
    (2**n parameters v; ||O|| <= 1). A control for the QNN: what a bounded readout without a circuit does."""

    dim: int
    complex_inputs: bool = False
    readout: float = 5.0

    def init(self, key):
        return 0.01 * jax.random.normal(key, (self.dim,), real_dtype())

    def prepare(self, xs):
        return jnp.asarray(np.asarray(xs), dtype=complex_dtype() if self.complex_inputs else real_dtype())

    def operator(self, params):
        return jnp.diag(jnp.tanh(params))

    def logits(self, params, xs):
        return self.readout * (jnp.abs(xs) ** 2) @ jnp.tanh(params)

    def layers_from_output(self, params):
        return jnp.zeros(params.shape, jnp.int32)

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


@dataclass(frozen=True)
class UnitaryObservable:
    """The QNN's function class with every circuit restriction removed: logit = readout * <psi|V^dag Z_{n-1} V|psi>
    for *any* unitary V (orthogonal for real inputs).

    V^dag Z V = 2P - 1 with P the projector onto a half-dimensional subspace (Z's +1 eigenspace rotated by V), and
    every such projector arises from some V. P is parametrised by a free (2**n, 2**(n-1)) matrix W (real, or its
    real and imaginary parts for complex inputs) as the projector onto W's columns, P = W (W^dag W)^-1 W^dag: a
    Grassmannian of dimension 4**n / 4 (real) carried by 4**n / 2 parameters. ``init`` starts at V = identity
    (W = the basis states whose last qubit is 0) plus 0.01 noise, as the QNN starts near the identity circuit.

    P does not depend on W's scale, but Adam's step does: it moves every entry by about lr, which turns a column
    of norm c by about lr * sqrt(m) / c, m its real entries. ``init`` therefore gives each column the norm
    sqrt(m), so that lr is the angle a column turns per step at every size, as it is the angle of a QNN's gate (at
    norm 1 and 2**10 complex amplitudes, the QNN's lr 0.03 turned every column by 1.4 rad a step, and the training
    never left chance).
    """

    dim: int
    complex_inputs: bool = False
    readout: float = 5.0

    def init(self, key):
        shape = (2, self.dim, self.dim // 2) if self.complex_inputs else (self.dim, self.dim // 2)
        start = np.zeros(shape, np.float64)
        start[(0,) * self.complex_inputs + (np.arange(0, self.dim, 2), np.arange(self.dim // 2))] = 1.0
        noisy = jnp.asarray(start, real_dtype()) + 0.01 * jax.random.normal(key, shape, real_dtype())
        return float(np.sqrt(self.column_entries)) * noisy

    @property
    def column_entries(self):
        """Real entries of one column of W: its real and imaginary parts for complex inputs."""
        return self.dim * (1 + self.complex_inputs)

    def prepare(self, xs):
        return jnp.asarray(np.asarray(xs), dtype=complex_dtype() if self.complex_inputs else real_dtype())

    def _columns(self, params):
        return params[0] + 1j * params[1] if self.complex_inputs else params

    def operator(self, params):
        w = self._columns(params)
        projector = w @ jnp.linalg.solve(w.conj().T @ w, w.conj().T)
        return 2 * projector - jnp.eye(self.dim, dtype=projector.dtype)

    def logits(self, params, xs):
        inside = projected_norms(self._columns(params), xs)
        return self.readout * (2 * inside - jnp.sum(jnp.abs(xs) ** 2, axis=1))

    def layers_from_output(self, params):
        return jnp.zeros(params.shape, jnp.int32)

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


def gram(w):
    """W^dag W. For a complex W = A + iB from real products: the real part [A; B]^T [A; B], the imaginary part
    A^T B - (A^T B)^T: three quarters of a complex product's real multiplications, in real products (which
    XLA's CPU backend runs faster per flop than complex ones)."""
    if not jnp.iscomplexobj(w):
        return w.T @ w
    a, b = jnp.real(w), jnp.imag(w)
    stacked, cross = jnp.concatenate([a, b]), a.T @ b
    return jax.lax.complex(stacked.T @ stacked, cross - cross.T)


def _projection(w, xs):
    """||P x||^2 of each row x of ``xs`` (P the projector onto the columns of ``w``), the Cholesky factor L of
    W^dag W, and L^-1 W^dag x (whose squared norm it is), one column per row of ``xs``."""
    chol = jnp.linalg.cholesky(gram(w))
    coeffs = jax.scipy.linalg.solve_triangular(chol, w.conj().T @ xs.T, lower=True)
    return jnp.sum(jnp.abs(coeffs) ** 2, axis=0), chol, coeffs


@jax.custom_jvp
def projected_norms(w, xs):
    """||P x||^2 of each row x of ``xs``, P = W (W^dag W)^-1 W^dag the orthogonal projector onto W's columns."""
    return _projection(w, xs)[0]


@projected_norms.defjvp
def _projected_norms_jvp(primals, tangents):
    """d||P x||^2 = 2 Re[(x - P x)^dag dW c + (P x)^dag dx] with c = (W^dag W)^-1 W^dag x: one product with the
    tangent, and its transpose one product in the gradient, where differentiating through the Cholesky factor
    costs several of the forward pass's."""
    (w, xs), (dw, dxs) = primals, tangents
    inside, chol, coeffs = _projection(w, xs)
    c = jax.scipy.linalg.solve_triangular(chol.conj().T, coeffs, lower=False)
    px = w @ c
    return inside, 2 * jnp.real(jnp.sum((xs.T - px).conj() * (dw @ c) + px.conj() * dxs.T, axis=0))


# ------------------------------------------------------------------------------------- on a device
NOISE_PROFILES = {"none": (0.0, 0.0, 0.0), "device": (2e-4, 3e-3, 1.5e-2), "device10": (2e-3, 3e-2, 1.5e-1)}
"""(p1, p2, r) of a named device: 'device' a current superconducting processor (single-qubit gate error 2e-4,
two-qubit 3e-3, readout 1.5e-2), 'device10' ten times worse."""
NOISE_LIMITS = {"p1": 1.0, "p2": 1.0, "r": 0.5}
SHOT_GRADIENTS = ("surrogate", "parameter_shift")
PAULI = np.array([[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, -1]], [[0, -1], [1, 0]]])
"""I, X, Z, XZ (= -iY): index k has X-bit k & 1 and Z-bit k >> 1, so a product of Paulis is, up to a global phase,
the Pauli of the XOR of their indices."""


def noise_levels(spec):
    """(p1, p2, r) of a ``--noise`` value: a profile name (``NOISE_PROFILES``) or ``p1=..,p2=..,r=..`` (missing
    entries 0). ValueError, in one line, for anything else."""
    if spec in NOISE_PROFILES:
        return NOISE_PROFILES[spec]
    levels = dict.fromkeys(NOISE_LIMITS, 0.0)
    for item in spec.split(","):
        name, _, value = item.partition("=")
        try:
            levels[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--noise {spec!r}: {item!r} is not name=number") from None
        if name.strip() not in NOISE_LIMITS or not 0 <= levels[name.strip()] <= NOISE_LIMITS[name.strip()]:
            raise ValueError(f"--noise {spec!r}: use a profile ({', '.join(NOISE_PROFILES)}) or p1=,p2= in [0, 1] "
                             "and r= in [0, 0.5]")
    return levels["p1"], levels["p2"], levels["r"]


@dataclass(frozen=True)
class Device:
    """How a QNN is measured: ``noise`` (a ``--noise`` value) gives local depolarizing channels of strength p1 after
    every qubit's rotation block and p2 on every ring bond, and readout error r (the measured bit flipped with
    probability r); ``shots`` (None: the exact expectation) the measurements per sample; ``shot_grad`` how a
    training step estimates gradients from shots; ``trajectories`` the Monte-Carlo trajectories per sample that
    simulate the gate noise. The default is the exact noiseless statevector."""

    noise: str = "none"
    shots: int | None = None
    shot_grad: str = "surrogate"
    trajectories: int = 1

    def __post_init__(self):
        noise_levels(self.noise)
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"--shots must be a positive integer, got {self.shots}")
        if self.shot_grad not in SHOT_GRADIENTS:
            raise ValueError(f"--shot-grad must be one of {', '.join(SHOT_GRADIENTS)}, got {self.shot_grad!r}")
        if self.trajectories < 1:
            raise ValueError(f"trajectories must be at least 1, got {self.trajectories}")

    @property
    def levels(self):
        return noise_levels(self.noise)

    @property
    def gate_noise(self):
        return self.levels[0] > 0 or self.levels[1] > 0

    @property
    def exact(self):
        return not self.gate_noise and self.levels[2] == 0 and self.shots is None


def row_keys(xs):
    """One PRNG key per row of ``xs`` (NumPy, a row along the last axis), from a hash of the row's bytes: a row's
    measurements derive from what it is, wherever it sits (the engine salts them per run, step and evaluation)."""
    flat = np.ascontiguousarray(xs).reshape(-1, np.shape(xs)[-1])
    words = np.array([np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), np.uint32)
                      for row in flat], np.uint32).reshape(*np.shape(xs)[:-1], 2)
    return jax.random.wrap_key_data(jnp.asarray(words))


def shot_estimate(key, expectation, shots):
    """The estimate of <Z> from ``shots`` measurements: 2 Binomial(N, (1 + E) / 2) / N - 1 (mean E, variance
    (1 - E**2) / N), drawn at once rather than shot by shot."""
    ones = jax.random.binomial(key, shots, jnp.clip((1 + expectation) / 2, 0, 1))
    return (2 * ones / shots - 1).astype(expectation.dtype)


@dataclass(frozen=True)
class DeviceQNN:
    """A QNN measured on a ``Device``: its inputs carry a PRNG key per row (``prepare``), which the engine folds
    with each step's and each evaluation's salt (``redraw``), so every output is a fresh measurement.

    Gate noise: every depolarizing channel is a mixture of Paulis, so a trajectory draws one Pauli per channel (the
    identity with probability 1 - p, each other with p/3 or p/15) and runs the pure-state circuit; the mean over
    ``trajectories`` trajectories is an unbiased estimate of the noisy expectation. A qubit's Pauli after its
    rotation block, and those the previous layer's ring put on it, multiply into that qubit's rotation gate (no
    extra gate). The ring's rzz gates commute and form one layer; each bond's channel acts at the end of it. The
    amplitude-encoded state preparation is ideal, as in the other QML-unlearning codes: no device prepares it
    cheaply. Readout error maps E to (1 - 2r) E exactly. Shots: ``shot_estimate`` of that expectation; the training
    gradient is the surrogate's (the loss at the shot estimate, the gradient of the expectation) or the parameter
    shift rule's (2P shot-noisy circuits, unbiased, what hardware does).
    """

    qnn: QNN
    device: Device

    def __post_init__(self):
        if self.qnn.ansatz == "cnot":
            raise ValueError("device noise is modelled for the rzz and noent circuits (the CNOT ring does not commute)")

    @property
    def param_shape(self):
        return self.qnn.param_shape

    def init(self, key):
        return self.qnn.init(key)

    def prepare(self, xs):
        return {"psi": self.qnn.prepare(xs), "key": row_keys(np.asarray(xs))}

    def layers_from_output(self, params):
        return self.qnn.layers_from_output(params)

    def pauli_errors(self, key):
        """One trajectory's Paulis: per (layer, qubit) the one after the rotation block and the one the previous
        layer's ring left on the qubit (entering the rotation gate), and the last ring's on the read-out qubit."""
        p1, p2, _ = self.device.levels
        shape = (self.qnn.depth, self.qnn.n_qubits)
        single_key, bond_key = jax.random.split(key)
        after = jax.random.categorical(single_key, jnp.log(jnp.array([1 - p1] + [p1 / 3] * 3)), shape=shape)
        bonds = jax.random.categorical(bond_key, jnp.log(jnp.array([1 - p2] + [p2 / 15] * 15)), shape=shape)
        bonds = bonds * (self.qnn.ansatz == "rzz")
        ring = bonds // 4 ^ jnp.roll(bonds % 4, 1, axis=1)  # bond i = (i, i + 1): Paulis bonds // 4 and bonds % 4
        before = jnp.concatenate([jnp.zeros_like(ring[:1]), ring[:-1]])
        return after, before, ring[-1, -1]

    def trajectory(self, params, psi, key):
        """<Z_{n-1}> of one noise trajectory."""
        after, before, last = self.pauli_errors(key)
        pauli = jnp.asarray(PAULI, complex_dtype())

        def layer(psi, xs):
            theta, a, b = xs
            return self.qnn.apply_layer(psi, pauli[a] @ self.qnn.rotation_gates(theta) @ pauli[b], theta), None

        psi, _ = jax.lax.scan(layer, psi, (params, after, before), unroll=True)
        return (1 - 2 * (last & 1)).astype(psi.real.dtype) * z_last(psi)  # an X or Y before the readout flips <Z>

    def expectation(self, params, psi, key):
        """The device's expectation of <Z_{n-1}>: exact, or the trajectory mean, then the readout error."""
        if self.device.gate_noise:
            keys = jax.random.split(key, self.device.trajectories)
            e = jnp.mean(jax.vmap(self.trajectory, in_axes=(None, None, 0))(params, psi, keys))
        else:
            e = self.qnn.expectation_z_last(params, psi)
        return (1 - 2 * self.device.levels[2]) * e

    def surrogate(self, params, psi, key):
        """The shot estimate, differentiated as the expectation. An unnormalised input (the paper's MNIST columns
        encoding) is prepared normalised and its estimate rescaled by ||psi||**2, known from the data."""
        noise_key, shot_key = jax.random.split(key)
        e = self.expectation(params, psi, noise_key)
        if self.device.shots is None:
            return e
        norm = jax.lax.stop_gradient(jnp.sum(jnp.abs(psi) ** 2))
        norm = jnp.where(norm > 0, norm, 1)  # a padding row of zeros
        return e + jax.lax.stop_gradient(norm * shot_estimate(shot_key, e / norm, self.device.shots) - e)

    def logits(self, params, xs):
        measure = MEASUREMENTS[self.device.shot_grad]
        return self.qnn.readout * jax.vmap(measure, in_axes=(None, None, 0, 0))(self, params, xs["psi"], xs["key"])

    def apply(self, params, xs):
        return jax.nn.sigmoid(self.logits(params, xs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def parameter_shift(model, params, psi, key):
    """The shot estimate of ``model`` (a ``DeviceQNN``), differentiated by the parameter-shift rule: every angle
    enters as exp(-i theta G / 2) with G**2 = 1 (rx, ry, rzz), so dE/dtheta = (E(theta + pi/2) - E(theta - pi/2)) / 2,
    each of the 2P shifted circuits measured with its own shots and trajectories."""
    return model.surrogate(params, psi, key)


def _shift_forward(model, params, psi, key):
    return model.surrogate(params, psi, key), (params, psi, key)


def _shift_backward(model, residual, cotangent):
    params, psi, key = residual
    flat = params.reshape(-1)
    shifts = 0.5 * np.pi * jnp.eye(flat.size, dtype=flat.dtype)
    keys = jax.random.split(jax.random.fold_in(key, 1), 2 * flat.size).reshape(2, flat.size)

    def measured(shift, k):
        return model.surrogate((flat + shift).reshape(params.shape), psi, k)

    plus = jax.vmap(measured)(shifts, keys[0])
    minus = jax.vmap(measured)(-shifts, keys[1])
    return (0.5 * cotangent * (plus - minus)).reshape(params.shape).astype(params.dtype), None, None


parameter_shift.defvjp(_shift_forward, _shift_backward)
MEASUREMENTS = {"surrogate": DeviceQNN.surrogate, "parameter_shift": parameter_shift}


def param_dtype(params):
    """The (real) dtype of a model's parameters: a run's learning rate and hyper-parameters are cast to it."""
    return jax.tree.leaves(params)[0].dtype


def param_count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def trained_parameters(model):
    """How many parameters a model trains (from the shapes of its initialisation; nothing is drawn)."""
    return param_count(jax.eval_shape(model.init, jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------- losses, metrics
def masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_sum(values, mask):
    return jnp.sum(values * mask)


def bce(logits, labels):
    """Per-sample binary cross-entropy from logits (what Keras computes for a sigmoid output)."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def probability_ce(logits, labels, eps=1e-14):
    """The authors' QNN cross-entropy, -(y log(p + eps) + (1 - y) log(1 - p + eps)) with p = sigmoid(logits).

    Unlike ``bce``, a confidently wrong sample (|logit| beyond about 32, where eps dominates) gets no gradient.
    1 - p is computed as sigmoid(-logits): identical, but XLA cannot fold it into (1 + eps) - p, which in float32
    is 0 for a saturated sample and turns the loss into NaN (the authors ran in float64, where it cannot happen).
    """
    y = labels.astype(logits.dtype)
    return -(y * jnp.log(jax.nn.sigmoid(logits) + eps) + (1 - y) * jnp.log(jax.nn.sigmoid(-logits) + eps))


def bernoulli_kl(teacher_logits, student_logits):
    """KL(teacher || student) of two Bernoulli distributions given by their logits."""
    p = jax.nn.sigmoid(teacher_logits)
    log_p, log_q = jax.nn.log_sigmoid(teacher_logits), jax.nn.log_sigmoid(student_logits)
    log_p1, log_q1 = jax.nn.log_sigmoid(-teacher_logits), jax.nn.log_sigmoid(-student_logits)
    return p * (log_p - log_q) + (1 - p) * (log_p1 - log_q1)


def one_sided_kl(teacher_logits, student_logits, eps=1e-14):
    """The authors' QNN divergence: p log((p + eps) / (q + eps)) on the positive-class probabilities only."""
    p, q = jax.nn.sigmoid(teacher_logits), jax.nn.sigmoid(student_logits)
    return p * jnp.log((p + eps) / (q + eps))


def keras_kl(teacher_logits, student_logits):
    """Keras' ``KLDivergence`` on (batch, 1) sigmoid outputs: p log(p / q), both clipped to [1e-7, 1]."""
    p = jnp.clip(jax.nn.sigmoid(teacher_logits), 1e-7, 1.0)
    q = jnp.clip(jax.nn.sigmoid(student_logits), 1e-7, 1.0)
    return p * jnp.log(p / q)


def keras_probability_ce(logits, labels):
    """Keras' ``binary_crossentropy`` on sigmoid probabilities clipped to [1e-7, 1 - 1e-7] (no logits)."""
    p, y = jnp.clip(jax.nn.sigmoid(logits), 1e-7, 1 - 1e-7), labels.astype(logits.dtype)
    return -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def hvp(loss, w, v):
    """Hessian-vector product H(w) v of a scalar function of a flat vector, forward-over-reverse."""
    return jax.jvp(jax.grad(loss), (w,), (v,))[1]


def exact_hessian(loss, w):
    return jax.hessian(loss)(w)


def rows_of(xs):
    """The number of rows of a model's input (an array, or a ``DeviceQNN``'s dict of states and keys)."""
    return jax.tree.leaves(xs)[0].shape[0]


def concat_rows(xs_list, axis=0):
    """Model inputs joined along their rows (arrays, or dicts of them)."""
    return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=axis), *xs_list)


def accuracy(model, params, xs, ys):
    return jnp.mean((model.logits(params, xs) > 0) == (ys > 0))


def evaluate_sets(model, params, xs_list, ys_list):
    """Correct-prediction flags of several evaluation sets in one forward pass, and the last set's predictions."""
    logits = model.logits(params, concat_rows(xs_list))
    sizes = np.cumsum([rows_of(x) for x in xs_list])[:-1]
    parts = jnp.split(logits, sizes)
    return [(z > 0) == (y > 0) for z, y in zip(parts, ys_list)], parts[-1] > 0


# ------------------------------------------------------------------------------------- engine
def batched(rng, order, batch_size, steps=None):
    """Sample orders (groups, m) cut into fixed-shape minibatches: ``idx`` and ``mask`` (groups, steps, batch),
    a per-step learning-rate ``scale`` and a per-step random word ``draw`` (groups, steps), the salt of the step's
    measurements on a device (``DeviceQNN``; drawn from a child of ``rng``, so the orders do not depend on it).
    The last batch of a group is padded with masked entries, so a partial batch compiles nothing new and weighs
    exactly its real samples (as Keras); ``steps`` pads further with empty steps (which change nothing), so that a
    subset's plan has a full set's shape."""
    groups, m = order.shape
    steps = max(-(-m // batch_size), steps or 0)
    idx = np.zeros((groups, steps * batch_size), np.int32)
    idx[:, :m] = order
    mask = np.broadcast_to(np.arange(steps * batch_size) < m, idx.shape)
    return {"idx": idx.reshape(groups, steps, batch_size), "mask": mask.reshape(groups, steps, batch_size),
            "scale": np.ones((groups, steps), np.float32),
            "draw": rng.spawn(1)[0].integers(2**32, size=(groups, steps), dtype=np.uint32)}


def epoch_plan(rng, n, batch_size, epochs):
    """Minibatches reshuffled every epoch, one group per epoch (metrics can be recorded after each)."""
    return batched(rng, np.stack([rng.permutation(n) for _ in range(epochs)]), batch_size)


def stop_after(plan, epochs):
    """An epoch plan whose groups after the first ``epochs`` are empty steps (which change nothing): training that
    stops early in a program of the full schedule's shape."""
    mask = plan["mask"].copy()
    mask[epochs:] = False
    return plan | {"mask": mask}


def subset_plan(rng, rows, n, batch_size, epochs):
    """:func:`epoch_plan` over the training rows ``rows`` only (indices into a set of ``n``), shaped as the plan
    of all ``n`` rows: a held-out split or a cross-validation fold trains in the same program as the full set."""
    rows = np.asarray(rows)
    return batched(rng, np.stack([rows[rng.permutation(len(rows))] for _ in range(epochs)]), batch_size,
                   steps=-(-n // batch_size))


def shuffle_buffer_order(rng, n, epochs, buffer):
    """Sample order of tf.data's ``repeat(epochs).shuffle(buffer)`` over samples 0..n-1: every output is drawn
    uniformly from a buffer that is refilled with the next element of the repeated stream. Early outputs come
    from the first ``buffer`` samples, and epochs overlap."""
    stream = np.tile(np.arange(n), epochs)
    pool, refill = list(stream[:buffer]), buffer
    out = np.empty(len(stream), np.int64)
    for k, u in enumerate(rng.random(len(stream))):
        j = int(u * len(pool))
        out[k] = pool[j]
        if refill < len(stream):
            pool[j], refill = stream[refill], refill + 1
        else:
            pool[j] = pool[-1]
            pool.pop()
    return out


def stream_plan(rng, n, batch_size, epochs, buffer=128):
    """The authors' QNN minibatches: the training set shuffled once (their ``shuffle_zip``), then
    ``repeat(epochs) -> shuffle(buffer) -> batch``; one group (batches straddle epochs; ceil(epochs * n / batch)
    steps, the last one partial)."""
    once = rng.permutation(n)
    return batched(rng, once[shuffle_buffer_order(rng, n, epochs, buffer)][None], batch_size)


def optax_adam(lr, eps):
    """optax's Adam: epsilon added to the square root of the bias-corrected second moment."""
    return optax.adam(lr, b1=ADAM_B1, b2=ADAM_B2, eps=eps)


class KerasAdamState(NamedTuple):
    count: jnp.ndarray
    mu: object
    nu: object


def keras_adam(lr, eps):
    """Keras' Adam, step for step: epsilon added to the square root of the *uncorrected* second moment,

        theta -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps),

    which is optax's Adam with epsilon eps / sqrt(1 - b2**t) (32x larger at step 1, 4.5x at step 50: it matters for
    a fresh optimiser on a memorised model's tiny gradients)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        mu = jax.tree.map(lambda m, g: m + (1 - ADAM_B1) * (g - m), state.mu, grads)
        nu = jax.tree.map(lambda v, g: v + (1 - ADAM_B2) * (g * g - v), state.nu, grads)
        t = (state.count + 1).astype(jnp.result_type(lr))
        alpha = lr * jnp.sqrt(1 - ADAM_B2**t) / (1 - ADAM_B1**t)
        updates = jax.tree.map(lambda m, v: (-alpha * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return updates, KerasAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: per-sample cross-entropy and divergence, the minibatch reduction, the optimiser
    (``optimizer(lr, eps)``: :func:`optax_adam` or :func:`keras_adam`) and its epsilon, and the minibatch order
    (``"epochs"``: reshuffled every epoch; ``"stream"``: :func:`stream_plan`). With ``weight_decay``, decoupled
    weight decay (AdamW's: every step also subtracts lr * aux['weight_decay'] * params) of a per-run strength."""

    ce: object = bce
    kl: object = bernoulli_kl
    reduce: object = masked_mean
    optimizer: object = optax_adam
    adam_eps: float = KERAS_EPS
    order: str = "epochs"
    buffer: int = 128
    weight_decay: bool = False

    def plan(self, rng, n, batch_size, epochs):
        if self.order == "stream":
            return stream_plan(rng, n, batch_size, epochs, self.buffer)
        return epoch_plan(rng, n, batch_size, epochs)


ENGINE = Recipe()
"""Our definitions: mean BCE from logits, Bernoulli KL, optax's Adam with epsilon 1e-7, minibatches reshuffled every
epoch."""
KERAS = Recipe(optimizer=keras_adam)
"""The authors' Keras MLP: the engine's definitions with Keras' Adam (fidelity item k)."""


def ce_term(t, logits, labels, mask):
    """The recipe's cross-entropy of a minibatch, reduced over its real samples."""
    return t.recipe.reduce(t.recipe.ce(logits, labels), mask)


def ce_loss(t, params, batch, mask, aux):
    """Cross-entropy on the minibatch ``batch['x'], batch['y']`` (``t``: the Trainer, for model and recipe)."""
    return ce_term(t, t.model.logits(params, batch["x"]), batch["y"], mask)


ROW_SCORES = {"flip_fit": "poisoned", "held_acc": "held"}
"""Accuracies on a subset of the training rows, with the labels as trained, reported when ``aux`` carries the
subset's 0/1 mask: ``flip_fit`` on the poisoned rows (how much of the poison the model fitted), ``held_acc`` on
rows held out of training (early stopping, cross-validation)."""


def fit_metrics(model, params, data, aux, shared):
    """Accuracy on the training data as trained, and on the clean validation set (one forward pass), and each of
    ``ROW_SCORES`` whose mask ``aux`` carries."""
    (train, val), _ = evaluate_sets(model, params, [data["x"], shared["x_val"]], [data["y"], shared["y_val"]])
    rows = {name: masked_mean(train, aux[mask]) for name, mask in ROW_SCORES.items() if mask in aux}
    return {"train_acc": jnp.mean(train), "val_acc": jnp.mean(val), **rows}


def generalised_ce(logits, labels, q):
    """Generalised cross-entropy (Zhang & Sabuncu 2018), (1 - p_y**q) / q per sample; q -> 0 is cross-entropy,
    q = 1 the mean absolute error. Robust to label noise because a confidently wrong sample's gradient is bounded."""
    log_p = jax.nn.log_sigmoid(jnp.where(labels > 0, logits, -logits))
    safe_q = jnp.where(q > 0, q, 1.0)
    return jnp.where(q > 0, -jnp.expm1(safe_q * log_p) / safe_q, -log_p)


DEFENCE_AUX = {"weight_decay": "weight_decay", "label_smooth": "smooth", "gce": "gce_q"}
"""Each strength-bearing label-noise defence and the ``aux`` entry that carries its strength."""


def defence_aux(name, strength):
    """The per-run strengths of :func:`defended_loss` and the decoupled weight decay for one recipe: ``name``'s
    strength, 0 for every other defence (``"plain"`` and ``"early_stop"``: all 0)."""
    return {key: np.float32(strength if name == defence else 0.0) for defence, key in DEFENCE_AUX.items()}


def defended_loss(t, params, batch, mask, aux):
    """The classical label-noise defences as one loss, their strengths per run in ``aux``: labels smoothed towards
    1/2 by ``aux['smooth']`` (0: none), then generalised cross-entropy with ``aux['gce_q']`` (0: cross-entropy).
    Decoupled weight decay is the recipe's (``Recipe.weight_decay``), early stopping a choice of epoch."""
    logits = t.model.logits(params, batch["x"])
    y = batch["y"].astype(logits.dtype)
    soft = y * (1 - aux["smooth"]) + 0.5 * aux["smooth"]
    per_sample = jnp.where(aux["gce_q"] > 0, generalised_ce(logits, y, aux["gce_q"]), bce(logits, soft))
    return t.recipe.reduce(per_sample, mask)


@dataclass(frozen=True)
class Trainer:
    """What fixes a compiled training program: model, recipe, loss, metrics, minibatch size.

    ``loss(trainer, params, batch, mask, aux)`` sees a minibatch of the per-sample arrays in ``data``;
    ``metrics(model, params, data, aux, shared)`` returns a dict of scalars (see :func:`fit` for when). With
    ``masked``, updates are multiplied by ``aux['update_mask']`` (a 0/1 pytree like the parameters). Hashable:
    one compilation per trainer and shape.
    """

    model: object
    loss: object = ce_loss
    metrics: object = fit_metrics
    batch_size: int = 32
    recipe: Recipe = ENGINE
    masked: bool = False


def fit(trainer, params, data, plan, lr, aux, shared, record):
    """Adam on ``trainer.loss`` along a minibatch ``plan``; loops run inside the compiled program.

    A step whose minibatch holds no real sample changes nothing (parameters and optimiser state), so plans
    of one shape can carry optional steps. Returns ``(params, metrics)``, metrics with a leading axis of one
    entry per group (epoch): evaluated after the groups where ``record`` (a traced boolean per group, the same
    for every run) is true, zeros elsewhere. Recording every epoch or only the last is thus one program.
    """
    model = trainer.model
    lr = jnp.asarray(lr, param_dtype(params))
    opt = trainer.recipe.optimizer(lr, trainer.recipe.adam_eps)
    if trainer.recipe.weight_decay:
        opt = optax.chain(opt, optax.add_decayed_weights(-lr * aux["weight_decay"]))
    grad_fn = jax.grad(trainer.loss, argnums=1)

    def step(carry, s):
        params, state = carry
        batch, step_aux = redraw((jax.tree.map(lambda a: a[s["idx"]], data), aux), s["draw"])
        updates, new_state = opt.update(grad_fn(trainer, params, batch, s["mask"], step_aux), state, params)
        live = jnp.any(s["mask"])
        if trainer.masked:
            updates = jax.tree.map(jnp.multiply, updates, aux["update_mask"])
        updates = jax.tree.map(lambda u: u * (s["scale"] * live).astype(u.dtype), updates)
        state = jax.tree.map(lambda new, old: jnp.where(live, new, old), new_state, state)
        return (optax.apply_updates(params, updates), state), None

    def evaluate(params, salt):
        return trainer.metrics(model, params, *redraw(redraw((data, aux, shared), EVALUATION), salt))

    def skip(params, salt):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(evaluate, params, salt))

    def group(carry, xs):
        steps, keep = xs
        carry, _ = jax.lax.scan(step, carry, steps)
        # a real branch: ``keep`` is not per run; a device measures afresh after each recorded group
        return carry, jax.lax.cond(keep, evaluate, skip, carry[0], steps["draw"][-1])

    (params, _), history = jax.lax.scan(group, (params, opt.init(params)), (plan, record))
    return params, history


EVALUATION = 0x9E3779B9  # folded into the measurement keys of an evaluation (a step folds in its own draw only)


def redraw(tree, salt):
    """Every PRNG key of ``tree`` (a ``DeviceQNN``'s per-row measurement keys) with ``salt`` folded in, the rest
    unchanged: fresh shots and noise trajectories at each step from one key per row. A no-op without keys."""
    def fold(leaf):
        if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return leaf
        folded = jax.vmap(jax.random.fold_in, in_axes=(0, None))(leaf.reshape(-1), jnp.uint32(salt))
        return folded.reshape(leaf.shape)

    return jax.tree.map(fold, tree)


def redraw_runs(tree):
    """``redraw`` with each run's index as its salt (leading run axis): independent measurements per run."""
    runs = len(jax.tree.leaves(tree)[0])
    return jax.vmap(redraw)(tree, jnp.arange(runs, dtype=jnp.uint32))


TRACE_COUNT = {"fit": 0}  # incremented each time JAX traces the runs function (tests count compilations)


@functools.cache
def compiled_runs(trainer):
    """``fit`` vmapped over independent runs (params, data, plan, lr, aux) and jitted, once per trainer; the
    common argument is ``(shared, record)``."""

    def runs(params, data, plan, lrs, aux, common):
        TRACE_COUNT["fit"] += 1
        return jax.vmap(functools.partial(fit, trainer), in_axes=(0, 0, 0, 0, 0, None, None))(
            params, data, plan, lrs, aux, *common)

    return jax.jit(runs)


class Trained(NamedTuple):
    """Output of :func:`train_runs`: parameters and metrics with a leading run axis (NumPy), compile and run
    wall seconds (run time excludes compilation)."""

    params: object
    metrics: dict
    compile_s: float
    run_s: float


MESH = None  # the one-axis device mesh of the run axis, set by use_devices (None: one device, no sharding)
MIN_RUNS_PER_DEVICE = 2  # XLA compiles a batch of one run without its batch axis, with other rounding: pad to two


def use_devices(count=None):
    """Split the run axis of every training over ``count`` local devices (default all) with ``jax.sharding``.

    Returns the number of devices used. Runs are independent, so sharded and unsharded results agree.
    """
    global MESH
    available = jax.local_devices()
    if count is not None and not 1 <= count <= len(available):
        raise ValueError(f"--devices {count}: this machine has {len(available)} local device(s)")
    devices = available[: count or len(available)]
    MESH = jax.sharding.Mesh(np.array(devices), ("runs",)) if len(devices) > 1 else None
    return len(devices)


def device_count():
    return 1 if MESH is None else MESH.size


def place(per_run, shared):
    """Put per-run arrays on the devices, split along their leading run axis, and shared ones on every device."""
    if MESH is None:
        return per_run, shared
    spec = jax.sharding.PartitionSpec
    return (jax.device_put(per_run, jax.sharding.NamedSharding(MESH, spec("runs"))),
            jax.device_put(shared, jax.sharding.NamedSharding(MESH, spec())))


def compile_key(key, args):
    """What one compilation is for: a program's key, its arguments' structure and shapes, and the devices."""
    leaves, tree = jax.tree.flatten(args)
    return key, tree, device_count(), tuple((a.shape, str(a.dtype)) for a in leaves)


class Executor:
    """Runs the engine's programs: compiles each (key, argument shapes) once, ahead of time, then executes it.

    Every run-mapped program goes through ``EXECUTOR.run``; ``plan.Tally`` stands in for it to size a run without
    running it (``--plan``), which is why each call states its ``work``: sample-gradient evaluations per run.
    """

    def __init__(self):
        self.executables, self.compiling = {}, {}

    def run(self, key, program, args, *, runs, work):
        """Outputs of ``program(*args)`` (``runs`` real runs of its width), compile and run seconds. Thread-safe:
        a thread that needs a program another is compiling waits for it."""
        ckey = compile_key(key, args)
        compile_s = 0.0
        with self.compiling.setdefault(ckey, threading.Lock()):
            if ckey not in self.executables:
                start = time.perf_counter()
                self.executables[ckey] = program.lower(*args).compile()
                compile_s = time.perf_counter() - start
        start = time.perf_counter()
        res = jax.block_until_ready(self.executables[ckey](*args))
        return res, compile_s, time.perf_counter() - start

    def call(self, key, fn, args, *, work):
        """``fn(*args)`` of a jitted function that is not run-mapped (the Hessian's), ``work`` as in ``run``."""
        return fn(*args)


EXECUTOR = Executor()


def take_runs(tree, idx):
    """Runs ``idx`` (an index array) of every array of a pytree with a leading run axis. Arrays in host memory
    (NumPy's, or a CPU device's) are indexed by NumPy: an eager gather compiles once per shape, and a unit meets
    dozens of shapes (0.15 s each on a 2-core CPU). Typed PRNG keys, which NumPy cannot hold, are gathered."""
    return jax.tree.map(lambda a: np.asarray(a)[idx] if numpy_can_index(a) else a[idx], tree)


def numpy_can_index(a):
    """Whether ``a`` is in host memory (NumPy's, or a CPU device's) and of a dtype NumPy has."""
    if not isinstance(a, jax.Array):
        return True
    return not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) and all(d.platform == "cpu" for d in a.devices())


def map_runs(key, program, per_run, common=None, *, chunk=None, work=0.0):
    """Apply a jitted, run-vmapped ``program(*per_run, common)`` to R runs (leading axis of ``per_run``).

    Runs go through at most ``chunk`` at a time (default all), in calls of one width that pads least, split across
    the devices of :func:`use_devices` with at least ``MIN_RUNS_PER_DEVICE`` each (so that sharded and unsharded
    runs round alike); a partial call is padded by repeating a run, so the shape, and hence the compilation, never
    changes.
    ``work``: sample-gradient evaluations of one run (a forward pass counts a third), for ``--plan``.
    Returns ``(outputs as NumPy with leading axis R, compile seconds, run seconds without compilation)``.
    """
    num = len(jax.tree.leaves(per_run)[0])
    calls = -(-num // min(chunk or num, num))
    width = max(-(-num // (calls * device_count())), MIN_RUNS_PER_DEVICE) * device_count()  # balanced: least padding
    out, compile_s, run_s = [], 0.0, 0.0
    for begin in range(0, num, width):
        idx = np.minimum(np.arange(begin, begin + width), num - 1)
        args = place(take_runs(per_run, idx), common)
        res, seconds, run = EXECUTOR.run(key, program, (*args[0], args[1]), runs=min(width, num - begin),
                                         work=work)
        run_s += run
        compile_s += seconds
        out.append(jax.tree.map(lambda a: np.asarray(a)[: min(width, num - begin)], res))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out), compile_s, run_s


def train_runs(trainer, params, data, plan, lr, *, aux=None, shared=None, every_epoch=False, record=None, chunk=None):
    """Train R independent runs at once; every per-run argument has a leading axis of length R.

    ``plan`` holds each run's minibatches (:func:`epoch_plan`, :func:`stream_plan`); ``lr`` is a scalar or an
    (R,) array; ``shared`` (validation data) is the same for all runs. See :func:`map_runs` for ``chunk``.
    Metrics are those after the last epoch, or with ``every_epoch`` an epoch axis of one entry after each epoch,
    or with ``record`` (a boolean per epoch) that axis with zeros after the epochs not recorded (the same compiled
    program: see :func:`fit`).
    """
    lrs = np.broadcast_to(np.asarray(lr, real_dtype()), (len(plan["idx"]),))
    epochs = plan["idx"].shape[1]
    every_epoch = every_epoch or record is not None
    record = np.arange(epochs) >= (0 if every_epoch else epochs - 1) if record is None else np.asarray(record)
    per_run = (params, data, plan, lrs, {} if aux is None else aux)
    work = plan["idx"][0].size + np.sum(record) * forward_rows(data) / 3  # the steps, then each recorded evaluation
    (params, history), compile_s, run_s = map_runs(trainer, compiled_runs(trainer), per_run,
                                                   ({} if shared is None else shared, record), chunk=chunk, work=work)
    metrics = history if every_epoch else jax.tree.map(lambda a: a[:, -1], history)
    return Trained(params, metrics, compile_s, run_s)


def forward_rows(per_run):
    """Rows of one run's samples in per-run arrays (leading run axis, then rows): the ``*y`` label arrays'."""
    return sum(a.shape[1] for path, a in jax.tree_util.tree_flatten_with_path(per_run)[0]
               if str(getattr(path[-1], "key", "")).endswith("y") and np.ndim(a) >= 2)


def stack_plans(plans):
    """Per-run plans (dicts of arrays) stacked along a leading run axis."""
    return jax.tree.map(lambda *a: np.stack(a), *plans)


@functools.cache
def run_logits(model, shared_inputs=False):
    """``model.logits`` vmapped over runs and jitted once per model: parameters have a leading run axis, and so
    do the inputs unless ``shared_inputs``."""
    return jax.jit(jax.vmap(model.logits, in_axes=(0, None if shared_inputs else 0)))


def init_runs(model, keys):
    """Initial parameters of R runs, one raw key each (a sequence or an (R, 2) array), along a leading run axis.

    The draws of ``jax.vmap(model.init)`` (up to the last bit of an occasional float32 entry, which XLA vectorises
    differently), from one compiled program per model and precision called once per key: vmapped, the draw compiles
    once per number of runs (a quick run meets a dozen, 1-2 s each on a 2-core CPU)."""
    program = _init_program(model, str(real_dtype()))
    return jax.device_put(jax.tree.map(lambda *runs: np.stack(runs), *[program(key) for key in np.asarray(keys)]))


@functools.cache
def _init_program(model, precision):
    return jax.jit(model.init)  # traced in ``precision``, the process's when first called


# ------------------------------------------------------------------------------------- seeding
def unit_seed(seed, *identity):
    """A 63-bit integer derived deterministically from a seed and a unit's whole identity (any printable values):
    the SHA-256 of a canonical encoding (the JSON list of each part's ``str``) seeds a ``SeedSequence`` as eight
    32-bit words, so identities that differ anywhere, in any part, get independent streams."""
    digest = hashlib.sha256(json.dumps([str(seed), *map(str, identity)]).encode()).digest()
    entropy = np.random.SeedSequence([int(w) for w in np.frombuffer(digest, np.uint32)])
    return int(entropy.generate_state(1, np.uint64)[0] >> np.uint64(1))


def unit_rng(seed, *identity):
    """A NumPy generator for one random draw of one unit: every draw derives from --seed and an identity."""
    return np.random.default_rng(unit_seed(seed, *identity))


def unit_key(seed, *identity):
    """A JAX key for one random draw of one unit."""
    return jax.random.PRNGKey(unit_seed(seed, *identity))


def rng_key(rng):
    """A JAX key drawn from a NumPy generator."""
    return jax.random.PRNGKey(int(rng.integers(2**62)))
