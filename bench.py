"""Benchmark of the training step of each model: compilation and steady-state throughput.

Prints one JSON object per line. Defaults: the QNN at 10 qubits / depth 6 / batch 256 in complex64 and
complex128, the XXZ QNN at 12 qubits / depth 4, and the MLP [64, 16]; batch 4096 lines when a GPU is
present. Targets (design section 10): compile <= 15 s per shape; QNN >= 2,700 sample-gradients/s on a
2-core CPU in complex64; >= 500,000 on one H100 at batch 4096.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import datar
import models


def train_step(model, lr=0.005):
    opt = optax.adam(lr, eps=models.KERAS_EPS)

    def step(params, state, xs, ys):
        loss, grads = jax.value_and_grad(
            lambda p: models.bce(model.logits(p, xs), ys))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, jax.jit(step, donate_argnums=(0, 1))


def bench(model, in_dim, batch, seconds):
    """Compile time and sample-gradients per second of one Adam step of ``model``."""
    rng = np.random.default_rng(0)
    xs = model.prepare(datar.random_unit_vectors(batch, in_dim, rng))
    ys = jnp.asarray(rng.integers(0, 2, batch))
    params = model.init(jax.random.PRNGKey(0))
    opt, step = train_step(model)
    state = opt.init(params)
    start = time.perf_counter()
    params, state, loss = step(params, state, xs, ys)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        params, state, loss = step(params, state, xs, ys)
        steps += 1
    loss.block_until_ready()
    return {"compile_s": round(compile_s, 2),
            "sample_grads_per_s": round(steps * batch / (time.perf_counter() - start))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["qnn", "mlp", "all"], default="all")
    parser.add_argument("--qubits", type=int, help="QNN qubits (default: the study's sizes)")
    parser.add_argument("--depth", type=int, help="QNN depth")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 256, and 4096 on a GPU)")
    parser.add_argument("--dtype", choices=models.PRECISIONS, nargs="+", help="precisions to time")
    parser.add_argument("--group-size", type=int, default=5, help="qubits per merged rotation gate")
    parser.add_argument("--seconds", type=float, default=5.0, help="steady-state timing window per line")
    args = parser.parse_args()

    device = jax.devices()[0].platform
    batches = args.batch or ([256, 4096] if device == "gpu" else [256])
    shapes = [(args.qubits, args.depth)] if args.qubits else [(10, 6), (12, 4)]
    runs = []
    if args.model in ("qnn", "all"):
        for qubits, depth in shapes:
            depth = args.depth or depth
            dtypes = args.dtype or (["complex64", "complex128"] if qubits == 10 else ["complex64"])
            for dtype in dtypes:
                for batch in batches:
                    runs.append(("qnn", {"qubits": qubits, "depth": depth}, dtype, batch,
                                 models.QNN(qubits, depth, group_size=args.group_size), 2**qubits))
    if args.model in ("mlp", "all"):
        for batch in batches:
            runs.append(("mlp", {"hidden": [64, 16]}, "complex64", batch, models.MLP((64, 16)), 1024))
    for name, shape, dtype, batch, model, in_dim in runs:
        models.set_precision(dtype)
        result = bench(model, in_dim, batch, args.seconds)
        print(json.dumps({"model": name, **shape, "batch": batch, "dtype": dtype, "device": device,
                          **result}), flush=True)


if __name__ == "__main__":
    main()
