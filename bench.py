"""Benchmark of the training step of each model: compilation and steady-state throughput.

Prints one JSON object per line. Defaults: the QNN at 10 qubits / depth 6 / batch 256 in complex64 and complex128
with, in the same run, two plain-JAX formulations of the same circuit as yardsticks (no TensorCircuit; each checked
against the QNN's outputs first): a batched-einsum statevector, and real matrix products on [re; im] pairs with the
batch axis last; the XXZ QNN at 12 qubits / depth 4; the MLP [64, 16]; batch 4096 lines when a GPU is
present; the QNN measured on a device (one noise trajectory, shots, the parameter-shift rule). ``--devices 1 2``
times a population of runs (vmapped, the run axis sharded with ``jax.sharding``) per device count; on a CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N. Targets (design
section 10): compile <= 15 s per shape; QNN >= 2,700 sample-gradients/s on a 2-core CPU in complex64; >= 500,000 on
one H100 at batch 4096. Each step also reports its XLA-counted GFLOP/s and their fraction of a dense matrix product's
(``matmul-1024``, timed in the same run): the distance to what the cores can do.

    python bench.py
    python bench.py --peers                           # qujax and PennyLane beside ours, if installed
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench.py --model qnn --devices 1 2 --runs 8
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import datar
import models
import peers


def train_step(model, lr=0.005):
    opt = optax.adam(lr, eps=models.KERAS_EPS)

    def step(params, state, xs, ys):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(models.bce(model.logits(p, xs), ys)))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, step


class EinsumQNN(models.QNN):
    """The same circuit as a plain batched-einsum statevector (qubits split in two halves, each half's rotations
    as one Kronecker-product matrix, the rzz ring as a phase): the reference the TensorCircuit circuit is timed
    against. Not used by the study."""

    def logits(self, params, xs):
        n, half = self.n_qubits, self.n_qubits // 2
        psi = xs.reshape(xs.shape[0], 2**half, 2 ** (n - half))
        signs = jnp.asarray(models.ring_zz_signs(n), params.dtype)
        for theta in params:
            rots = jax.vmap(self._rotation)(theta)
            left, right = models.kron_all(list(rots[:half])), models.kron_all(list(rots[half:]))
            psi = jnp.einsum("ij,bjk,lk->bil", left, psi, right)
            psi = psi * jnp.exp(-0.5j * (theta[:, 3] @ signs)).reshape(2**half, -1)
        probs = jnp.abs(psi.reshape(xs.shape[0], -1, 2)) ** 2
        return 5.0 * jnp.sum(probs[..., 0] - probs[..., 1], axis=1)


def real_pairs(m):
    """A complex matrix (..., k, k) as the real (..., 2k, 2k) one acting on a vector stacked as [re; im]."""
    re, im = jnp.real(m), jnp.imag(m)
    return jnp.concatenate([jnp.concatenate([re, -im], -1), jnp.concatenate([im, re], -1)], -2)


def real_pairs_interleaved(m):
    """``real_pairs`` for a vector stored as (re, im) pairs: index 2 * row + (0 for re, 1 for im)."""
    k = m.shape[-1]
    return real_pairs(m).reshape(2, k, 2, k).transpose(1, 0, 3, 2).reshape(2 * k, 2 * k)


class RealPairQNN(models.QNN):
    """The same circuit in real arithmetic with the batch axis last: the state as an array (top qubits, re/im,
    bottom qubits, batch) and each layer two real matrix products, the top half's rotations as one matrix on the
    leading (top, re/im) axes and, per top index, the bottom half's rotations times the previous layer's rzz
    phases (the last layer's phases change no probability and are left out). Not used by the study: the
    yardstick of what real matrix products reach here (XLA:CPU multiplies complex64 matrices at about half the
    rate of float32 ones of the same work) and of the layout's worth."""

    def logits(self, params, xs):
        n, batch = self.n_qubits, xs.shape[0]
        split = n - n // 2  # the top qubits; the bottom half, whose matrix is per top index, is the smaller
        top, bottom = 2**split, 2 ** (n // 2)
        signs = jnp.asarray(models.ring_zz_signs(n), params.dtype)
        psi = xs.T.reshape(top, 1, bottom, batch)
        state = jnp.concatenate([jnp.real(psi), jnp.imag(psi)], axis=1).reshape(top, 2 * bottom, batch)
        phases = jnp.ones((top, bottom), xs.dtype)
        for theta in params:
            rots = self.rotation_gates(theta)
            upper, lower = models.kron_all(list(rots[:split])), models.kron_all(list(rots[split:]))
            state = real_pairs(lower * phases[:, None, :]) @ state
            state = real_pairs_interleaved(upper) @ state.reshape(2 * top, bottom * batch)
            state = state.reshape(top, 2 * bottom, batch)
            phases = jnp.exp(-0.5j * (theta[:, 3] @ signs)).astype(xs.dtype).reshape(top, bottom)
        probs = jnp.sum(state.reshape(top, 2, bottom // 2, 2, batch) ** 2, axis=1)
        return self.readout * jnp.sum(probs[:, :, 0] - probs[:, :, 1], axis=(0, 1))


YARDSTICKS = {"qnn-einsum-reference": EinsumQNN, "qnn-real-pairs-reference": RealPairQNN}


def inputs(model, in_dim, batch):
    rng = np.random.default_rng(0)
    return model.prepare(datar.random_unit_vectors(batch, in_dim, rng)), jnp.asarray(rng.integers(0, 2, batch))


def timed(call, seconds):
    """Steps per second of ``call`` (already compiled) over a window of about ``seconds``."""
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        jax.block_until_ready(call())
        steps += 1
    return steps / (time.perf_counter() - start)


def bench(model, in_dim, batch, seconds):
    """Compile time and sample-gradients per second of one Adam step of ``model``."""
    xs, ys = inputs(model, in_dim, batch)
    opt, step = train_step(model)
    params = model.init(jax.random.PRNGKey(0))
    args = (params, opt.init(params), xs, ys)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - start
    rate = timed(lambda: compiled(*args), seconds)
    return {"compile_s": round(compile_s, 2), "sample_grads_per_s": round(rate * batch),
            "xla_gflops": round(xla_flops(compiled) * rate / 1e9, 2)}


def xla_flops(compiled):
    """Floating-point operations of a compiled program by XLA's cost analysis (a complex multiply-add counts as
    two, as a real one: a rate in these units is comparable with the matrix product's, not with a peak)."""
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis).get("flops", float("nan")))


def matmul_gflops(dtype, seconds, n=1024):
    """XLA-counted GFLOP/s of a dense n x n matrix product in ``dtype``: what this machine's cores can do, the
    yardstick of the QNN step's ``matmul_fraction``."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    compiled = jax.jit(jnp.matmul).lower(a, a).compile()
    return xla_flops(compiled) * timed(lambda: compiled(a, a), seconds) / 1e9


def bench_devices(model, in_dim, batch, runs, devices, seconds):
    """Sample-gradients per second of ``runs`` independent Adam steps, vmapped, split across ``devices``."""
    models.use_devices(devices)
    xs, ys = inputs(model, in_dim, batch)
    opt, step = train_step(model)
    params = models.init_runs(model, jax.random.split(jax.random.PRNGKey(0), runs))
    per_run = (params, jax.vmap(opt.init)(params), *(jnp.broadcast_to(a, (runs, *a.shape)) for a in (xs, ys)))
    per_run, _ = models.place(per_run, {})
    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(step)).lower(*per_run).compile()
    compile_s = time.perf_counter() - start
    rate = timed(lambda: compiled(*per_run), seconds)
    return {"devices": devices, "runs": runs, "compile_s": round(compile_s, 2),
            "sample_grads_per_s": round(rate * batch * runs)}


DEVICE_LINES = {  # name: (Device, batch divisor): one trajectory, shots on top, and the parameter-shift rule
    "qnn-device-1-trajectory": (models.Device("device", trajectories=1), 1),
    "qnn-device-1-trajectory-1000-shots": (models.Device("device", shots=1000, trajectories=1), 1),
    "qnn-parameter-shift-1000-shots": (models.Device(shots=1000, shot_grad="parameter_shift"), 32),
}


def device_lines(shape, dtype, batch, qnn):
    """The QNN measured on a device (``models.DeviceQNN``): the noisy step's cost beside the exact one's. The
    parameter-shift line runs 2P + 1 circuits per sample, at a smaller batch."""
    return [(name, shape, dtype, max(batch // divisor, 1), models.DeviceQNN(qnn, device))
            for name, (device, divisor) in DEVICE_LINES.items()]


PEER_PACKAGES = {"qujax": "qujax", "pennylane-default-jax": "pennylane", "pennylane-lightning-adjoint": "pennylane_lightning"}


def run_peers(args):
    """Our QNN step, then each installed peer in a process of its own (its threads and memory settings apart)."""
    models.set_precision("complex64")
    qnn = models.QNN(args.qubits or 10, args.depth or 6)
    print(json.dumps({"model": "qnn", "qubits": qnn.n_qubits, "depth": qnn.depth, "batch": 256,
                      **bench(qnn, 2**qnn.n_qubits, 256, args.seconds)}), flush=True)
    for name, package in PEER_PACKAGES.items():
        if importlib.util.find_spec(package) is None:
            print(json.dumps({"model": name, "skipped": f"{package} is not installed"}), flush=True)
            continue
        command = [sys.executable, __file__, "--peer", name, "--seconds", str(args.seconds),
                   "--qubits", str(qnn.n_qubits), "--depth", str(qnn.depth)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
            print(done.stdout.strip() or json.dumps({"model": name, "error": done.stderr.strip().splitlines()[-1:]}),
                  flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({"model": name, "skipped": f"still compiling or running after {args.peer_timeout:.0f} s"}),
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["qnn", "mlp", "all"], default="all")
    parser.add_argument("--qubits", type=int, help="QNN qubits (default: the study's sizes)")
    parser.add_argument("--depth", type=int, help="QNN depth")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 256, and 4096 on a GPU)")
    parser.add_argument("--dtype", choices=models.PRECISIONS, nargs="+", help="precisions to time")
    parser.add_argument("--group-size", type=int, default=models.QNN.group_size, help="qubits per merged rotation")
    parser.add_argument("--devices", type=int, nargs="+", help="time a population of --runs runs on each of these "
                        "device counts instead")
    parser.add_argument("--runs", type=int, default=8, help="runs of the population timed with --devices")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: models.keep_freed_memory)")
    parser.add_argument("--seconds", type=float, default=5.0, help="steady-state timing window per line")
    parser.add_argument("--peers", action="store_true", help="time the same QNN step in qujax and PennyLane "
                        "(each installed one in its own process; see peers.py), after our own QNN line")
    parser.add_argument("--peer", choices=peers.PEERS, help=argparse.SUPPRESS)  # one peer, in this process
    parser.add_argument("--peer-timeout", type=float, default=900.0, help="seconds a peer may take (default 900)")
    args = parser.parse_args()
    malloc = "system" if args.system_malloc or not models.keep_freed_memory() else "kept"
    models.one_blas_thread()
    if args.peer:
        print(json.dumps(peers.run_peer(args.peer, args.qubits or 10, args.depth or 6, args.seconds)), flush=True)
        return
    if args.peers:
        run_peers(args)
        return

    device = jax.devices()[0].platform
    batches = args.batch or ([256, 4096] if device == "gpu" else [256])
    shapes = [(args.qubits, args.depth or 6)] if args.qubits else [(10, 6), (12, 4)]
    lines = []
    if args.model in ("qnn", "all"):
        for qubits, depth in shapes:
            depth = args.depth or depth
            for dtype in args.dtype or (["complex64", "complex128"] if qubits == 10 else ["complex64"]):
                for batch in batches:
                    shape = {"qubits": qubits, "depth": depth}
                    lines.append(("qnn", shape, dtype, batch, models.QNN(qubits, depth, group_size=args.group_size)))
                    if not args.devices:
                        lines += [(name, shape, dtype, batch, cls(qubits, depth)) for name, cls in YARDSTICKS.items()]
                    if not args.devices and dtype == "complex64":
                        lines += device_lines(shape, dtype, batch, models.QNN(qubits, depth))
    if args.model in ("mlp", "all"):
        lines += [("mlp", {"hidden": [64, 16]}, "complex64", batch, models.MLP((64, 16))) for batch in batches]
    yardstick = {}
    for name, shape, dtype, batch, model in lines:
        models.set_precision(dtype)
        if dtype not in yardstick and not args.devices:
            yardstick[dtype] = matmul_gflops(dtype, args.seconds)
            print(json.dumps({"model": "matmul-1024", "dtype": dtype, "device": device,
                              "xla_gflops": round(yardstick[dtype], 2)}), flush=True)
        in_dim = getattr(model, "in_dim", None) or 2 ** getattr(model, "qnn", model).n_qubits
        extra = {}
        if name in YARDSTICKS:  # a yardstick must compute the same circuit
            reference = models.QNN(model.n_qubits, model.depth)
            params = reference.init(jax.random.PRNGKey(1)) + 0.5
            xs = inputs(model, in_dim, 8)[0]
            extra["max_abs_diff_vs_qnn"] = float(jnp.abs(model.logits(params, xs) - reference.logits(params, xs)).max())
        results = ([bench_devices(model, in_dim, batch, args.runs, count, args.seconds) for count in args.devices]
                   if args.devices else [bench(model, in_dim, batch, args.seconds)])
        for result in results:
            if "xla_gflops" in result:
                result["matmul_fraction"] = round(result["xla_gflops"] / yardstick[dtype], 3)
            print(json.dumps({"model": name, **shape, "batch": batch, "dtype": dtype, "device": device,
                              "malloc": malloc, **result, **extra}), flush=True)


if __name__ == "__main__":
    main()
