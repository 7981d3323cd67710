"""Two sets of definitions: what the authors' code computes (``paper``) and our repairs (``corrected``).

The authors' code (github ``yutuer21/quantum-machine-unlearning``, ``src/``) differs from a textbook reading of
the paper in a few places that move the published numbers. Each difference is one field below, read at exactly
one place where the data or the loss is built, and the whole table is recorded in ``config.json``. The README's
"Fidelity" section explains every item.
"""

from dataclasses import asdict, dataclass, replace

import models


@dataclass(frozen=True)
class Fidelity:
    """One set of definitions; the letters are the items of the README's Fidelity table."""

    name: str
    mnist_encoding: str  # a: "columns" (per-column norm, unnormalised state) | "unit"
    feature_noise: str  # b: "paper" (floor(an) up to even, per class, noise in the unpadded image) | "haar"
    scrub_divergence: str  # c: "one_sided" (p log p/q on the positive class) | "bernoulli"
    scrub_forget_inputs: str  # d: "clean" (SCRUB's forget term on the clean inputs) | "poisoned"
    xxz_unlearn_qnn: str  # e: "realified" (13 qubits on [Re; Im]) | "complex" (12 qubits)
    teachers: str  # f: "shared" (one teacher, runs differ in batches) | "per_run" (own poison draw each)
    hessian: str  # g: "paper" (complex QNN parameters, ratio to the mean clean trace) | "corrected"
    qnn_training: str  # h: "paper" (summed probability CE, eps 1e-8, shuffle-buffer stream) | "engine"
    mnist_selection: str  # i: "first" (first 250 of each digit) | "seeded"
    mlp_precision: str = "dtype"  # j: "float32" (Keras' floatx, whatever --dtype) | "dtype" (results before j)
    mlp_optimizer: str = "optax"  # k: "keras" (Keras' Adam, epsilon before bias correction) | "optax" (before k)
    qnn_precision: str = "dtype"  # l: "float32" (TensorCircuit's implicit_randn default) | "dtype" (results before l)
    device: models.Device = models.Device()  # how QNNs are measured (--noise, --shots): config.json's "device"

    def recipe(self, kind, stage):
        """How a model kind (``"qnn"``/``"mlp"``) trains at a stage (``"train"``/``"unlearn"``): items c, h and k."""
        kind = TRAINS_AS[kind]
        base = TRAINING[self.qnn_training][kind][stage]
        if kind == "mlp":
            base = replace(base, optimizer=OPTIMIZERS[self.mlp_optimizer])
        return replace(base, kl=DIVERGENCES[self.scrub_divergence][kind]) if stage == "unlearn" else base

    @property
    def mlp_dtype(self):
        """The MLP's real dtype, or None for the process's (``--dtype``): item j."""
        return None if self.mlp_precision == "dtype" else self.mlp_precision

    @property
    def qnn_dtype(self):
        """The real dtype of the QNN's parameters, or None for the process's (``--dtype``): item l."""
        return None if self.qnn_precision == "dtype" else self.qnn_precision

    def as_dict(self):
        """The definitions (config.json's "fidelity"; the device is recorded apart)."""
        return {k: v for k, v in asdict(self).items() if k != "device"}


def from_settings(settings):
    """The fidelity of a run's settings, measuring its QNNs on the settings' device."""
    return replace(Fidelity(**settings["fidelity"]), device=models.Device(**settings["device"]))


_PAPER_QNN = {"train": models.Recipe(ce=models.probability_ce, reduce=models.masked_sum, adam_eps=1e-8,
                                     order="stream", buffer=128),
              "unlearn": models.Recipe(ce=models.probability_ce, adam_eps=1e-8)}
_ENGINE = {"train": models.ENGINE, "unlearn": models.ENGINE}
TRAINING = {
    # the authors' QNN: TensorCircuit's vvag sums the gradient over a batch; optax's Adam epsilon; tf.data stream.
    # Their MLP is Keras: mean BCE from the sigmoid's logits, Adam epsilon 1e-7, reshuffled every epoch (= ENGINE,
    # with Keras' Adam by item k).
    "paper": {"qnn": _PAPER_QNN, "mlp": _ENGINE},
    "engine": {"qnn": _ENGINE, "mlp": _ENGINE},
}
TRAINS_AS = {"qnn": "qnn", "observable": "qnn", "mlp": "mlp"}  # the observables are the QNN's controls: its recipe
OPTIMIZERS = {"keras": models.keras_adam, "optax": models.optax_adam}
DIVERGENCES = {
    "one_sided": {"qnn": models.one_sided_kl, "mlp": models.keras_kl},
    "bernoulli": {"qnn": models.bernoulli_kl, "mlp": models.bernoulli_kl},
}

PAPER = Fidelity("paper", mnist_encoding="columns", feature_noise="paper", scrub_divergence="one_sided",
                 scrub_forget_inputs="clean", xxz_unlearn_qnn="realified", teachers="shared", hessian="paper",
                 qnn_training="paper", mnist_selection="first", mlp_precision="float32", mlp_optimizer="keras",
                 qnn_precision="float32")
CORRECTED = Fidelity("corrected", mnist_encoding="unit", feature_noise="haar", scrub_divergence="bernoulli",
                     scrub_forget_inputs="poisoned", xxz_unlearn_qnn="complex", teachers="per_run",
                     hessian="corrected", qnn_training="engine", mnist_selection="seeded",
                     mlp_precision="dtype", mlp_optimizer="optax", qnn_precision="dtype")
FIDELITIES = {"paper": PAPER, "corrected": CORRECTED}
