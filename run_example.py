"""A few-minute tour of the study on a laptop CPU (MNIST 1 vs 9, bundled data, no download).

1. Resilience: train the QNN and an MLP on label-flipped data for a handful of poisoning ratios.
2. Unlearning: from teachers trained at alpha = 0.3, compare the paper's retrain, finetune, SCRUB and gradient
   ascent. Prints compact tables and saves results/example/example.png (+ the two CSVs).

    python run_example.py                         # the authors' definitions (--fidelity paper)
    python run_example.py --fidelity corrected    # our repairs: do the findings survive?
"""

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

import datar
import fidelity
import methods
import plots
import poison_unlearn as pu
import runner

OUT = Path("results/example")
SEED, RUNS = 0, 2  # the resilience sweeps run RUNS runs per compiled program, as the quick preset: so they share the
#                   QNN's with its teachers (RUNS runs, same schedule), and a CPU runs narrow programs faster
ALPHAS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
MODELS = [("qnn", "depth6", pu.Schedule(30, 64, 0.005)), ("mlp", "64-16", pu.Schedule(100, 256, 0.005))]
STUDIES = [pu.Study("qnn", "depth6", "label_flip", 0.3, pu.Schedule(30, 64, 0.005), pu.Schedule(10, 64, 0.01)),
           pu.Study("mlp", "16-4", "label_flip", 0.3, pu.Schedule(100, 128, 0.01), pu.Schedule(50, None, 0.001))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fidelity", default="paper", choices=sorted(fidelity.FIDELITIES),
                        help="definitions: paper (the authors', default) or corrected (our repairs)")
    fid = fidelity.FIDELITIES[parser.parse_args(argv).fidelity]
    runner.boot("complex64")  # the process settings of a run: malloc, BLAS threads, compilation cache
    start = time.perf_counter()
    ds = pu.Dataset("mnist", "none", *datar.mnist_data(500, seed=SEED, encoding=fid.mnist_encoding,
                                                       selection=fid.mnist_selection), raw_dim=784)
    print(f"\n1. Resilience to label flipping ({fid.name} definitions; validation accuracy on clean data, mean of"
          f" {RUNS} runs)")
    phase = pd.DataFrame([row for kind, arch, schedule in MODELS
                          for row in pu.resilience_unit(ds, kind, arch, "label_flip", ALPHAS, runs=RUNS,
                                                        schedule=schedule, seed=SEED, fid=fid, chunk=RUNS)])
    print(phase.pivot_table(index=["model", "arch"], columns="alpha", values=["train_acc", "val_acc"]).round(2)
          .to_string())
    print(f"\n2. Unlearning after training at alpha = 0.3 (final epoch, mean of {RUNS} runs)")
    unlearn = pd.DataFrame([row for study in STUDIES for row in pu.unlearn_unit(
        ds, study, pu.train_teachers(ds, study, runs=RUNS, seed=SEED, fid=fid, shared_teacher=fid.teachers == "shared"),
        method_names=methods.PAPER_METHODS, seed=SEED, fid=fid)[0]])
    final = plots.final_rows(unlearn)
    print(final.groupby(["model", "method"], sort=False)[["val_acc", "forget_poison_acc", "oracle_agree"]].mean()
          .round(3).to_string())
    OUT.mkdir(parents=True, exist_ok=True)
    phase.to_csv(OUT / "phase.csv", index=False)
    unlearn.to_csv(OUT / "unlearn.csv", index=False)
    figure = save_figure(phase, unlearn)
    print(f"\nFigure: {figure}   ({time.perf_counter() - start:.0f} s in all)")
    print("Next: python run_unlearn_mnist.py   then   python run_unlearn_xxz.py   (quick presets),\n"
          "then open test_mnist.ipynb, test_xxz.ipynb and heissian.ipynb (jupyter lab).")


def save_figure(phase, unlearn):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    sns.lineplot(data=phase, x="alpha", y="val_acc", hue="model", marker="o", errorbar="sd", ax=axes[0])
    axes[0].set(title="resilience to label flipping", xlabel="poisoning ratio α",
                ylabel="clean validation accuracy (fraction)", ylim=(0, 1.02))
    for ax, metric, label in ((axes[1], "val_acc", "validation accuracy (fraction)"),
                              (axes[2], "forget_poison_acc", "accuracy on the flipped labels (fraction)")):
        sns.lineplot(data=unlearn, x="epoch", y=metric, hue="method", style="model", errorbar=None, ax=ax)
        ax.set(title=f"unlearning: {metric}", xlabel="unlearning epoch", ylabel=label, ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(OUT / "example.png", dpi=130)
    return OUT / "example.png"


if __name__ == "__main__":
    main()
