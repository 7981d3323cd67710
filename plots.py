"""Figures of the study, drawn from the results tables (pandas DataFrames) with seaborn.

Used by the run scripts (``figures/`` of a results folder) and by the notebooks.
"""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

ACC = "accuracy (fraction correct)"
POISON_NAMES = {"label_flip": "label flipping", "feature_randomization": "feature randomisation"}
MODEL_NAMES = {"qnn": "QNN", "mlp": "MLP"}


def variant(df):
    """Readable name of each row's model variant: architecture, and the XXZ gauge where it matters."""
    gauge = df["gauge"].map(lambda g: "" if g in ("none", "random") else f", {g} gauge") if "gauge" in df else ""
    return df["arch"].astype(str) + gauge


def phase_figure(df):
    """Train and validation accuracy vs poisoning ratio, mean +- std over runs: poison x model panels."""
    long = df.assign(variant=variant(df)).melt(
        id_vars=["model", "variant", "poison", "alpha", "run"], value_vars=["train_acc", "val_acc"],
        var_name="metric", value_name="accuracy")
    long["metric"] = long["metric"].map({"train_acc": "train (poisoned)", "val_acc": "validation (clean)"})
    poisons = [p for p in POISON_NAMES if p in set(df["poison"])]
    kinds = [m for m in MODEL_NAMES if m in set(df["model"])]
    fig, axes = plt.subplots(len(poisons), len(kinds), figsize=(5.5 * len(kinds), 4 * len(poisons)),
                             squeeze=False, sharex=True, sharey=True)
    for (i, poison), (j, kind) in ((a, b) for a in enumerate(poisons) for b in enumerate(kinds)):
        ax = axes[i, j]
        part = long[(long["poison"] == poison) & (long["model"] == kind)]
        if len(part):
            sns.lineplot(data=part, x="alpha", y="accuracy", hue="variant", style="metric", markers=True,
                         errorbar="sd", ax=ax)
        ax.set(title=f"{MODEL_NAMES[kind]}, {POISON_NAMES[poison]}", xlabel="poisoning ratio α", ylabel=ACC,
               ylim=(-0.02, 1.02))
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    return fig


def study_name(row):
    return f"{MODEL_NAMES[row['model']]} {row['arch']}, {POISON_NAMES[row['poison']]} α={row['alpha']}"


def unlearn_figure(df, metrics=("val_acc", "forget_poison_acc")):
    """Validation and forgetting accuracy vs unlearning epoch, one line per method (+- std band)."""
    df = df.assign(study=df.apply(study_name, axis=1))
    names = list(dict.fromkeys(df["study"]))
    labels = {"val_acc": "validation accuracy", "forget_poison_acc": "forget-set accuracy\n(poisoned labels)",
              "forget_acc": "forget-set accuracy\n(clean labels)", "retain_acc": "retain accuracy",
              "oracle_agree": "agreement with retrain\n(validation predictions)"}
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(5 * len(names), 3.6 * len(metrics)), squeeze=False,
                             sharex="col")
    for j, name in enumerate(names):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            sns.lineplot(data=df[df["study"] == name], x="epoch", y=metric, hue="method", errorbar="sd", ax=ax,
                         legend=(i == 0 and j == 0))
            ax.set(title=name if i == 0 else "", xlabel="unlearning epoch", ylabel=f"{labels[metric]} (fraction)",
                   ylim=(-0.02, 1.02))
    fig.tight_layout()
    return fig


def sweep_figure(df):
    """Final validation accuracy: SCRUB heatmap over (kl_w, fo_w) and gradient ascent vs fo_w."""
    kinds = [m for m in MODEL_NAMES if m in set(df["model"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 9), squeeze=False)
    for j, kind in enumerate(kinds):
        scrub = df[(df["model"] == kind) & (df["method"] == "scrub")]
        grid = scrub.pivot_table(index="kl_w", columns="fo_w", values="val_acc", aggfunc="mean")
        sns.heatmap(grid, ax=axes[0, j], vmin=0, vmax=1, cmap="viridis", annot=grid.shape[1] <= 10, fmt=".2f",
                    cbar_kws={"label": "final validation accuracy (fraction)"})
        axes[0, j].set(title=f"{MODEL_NAMES[kind]}: SCRUB", xlabel="forget weight fo_w", ylabel="KL weight kl_w")
        axes[0, j].invert_yaxis()
        ascent = df[(df["model"] == kind) & (df["method"] == "grad_ascent")]
        long = ascent.melt(id_vars=["fo_w", "run"], value_vars=["val_acc", "forget_poison_acc"], var_name="metric",
                           value_name="accuracy")
        sns.lineplot(data=long, x="fo_w", y="accuracy", hue="metric", marker="o", errorbar="sd", ax=axes[1, j])
        axes[1, j].set(title=f"{MODEL_NAMES[kind]}: gradient ascent", xlabel="forget weight fo_w", ylabel=ACC,
                       ylim=(-0.02, 1.02))
    fig.tight_layout()
    return fig


FIGURES = {"phase": phase_figure, "unlearn": unlearn_figure, "sweep": sweep_figure}


def save(fig, folder, name):
    """Write ``name``.png and ``name``.pdf into ``folder`` (created if needed); returns the PNG path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return folder / f"{name}.png"


def save_part_figure(out, part, csv_path):
    """Redraw the figure of one part of a results folder from its CSV."""
    if part in FIGURES and Path(csv_path).exists():
        return save(FIGURES[part](pd.read_csv(csv_path, keep_default_na=False, na_values=["nan"])),
                    Path(out) / "figures", part)
    return None


# ------------------------------------------------------------------------------ the data itself
def digits_figure(xs, ys, poisoned_sets, count=6):
    """Sample training digits: clean, then each poisoned version (rows), titled with the label used."""
    idx = np.unique(np.concatenate([s[2] for s in poisoned_sets.values()]))[:count]
    rows = {"clean": (xs, ys), **{name: (s[0], s[1]) for name, s in poisoned_sets.items()}}
    fig, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.9 * len(rows)), squeeze=False)
    for i, (name, (x, y)) in enumerate(rows.items()):
        for j, k in enumerate(idx):
            axes[i, j].imshow(np.abs(x[k, :784]).reshape(28, 28), cmap="gray_r")
            axes[i, j].set(xticks=[], yticks=[], title=f"label {y[k]} ({'9' if y[k] else '1'})")
        axes[i, 0].set_ylabel(name.replace("_", " "))
    fig.suptitle("training images (|amplitude|, 28 x 28 pixels) and the labels the models see")
    fig.tight_layout()
    return fig


def tsne_figure(sets, seed=0):
    """t-SNE maps (scikit-learn) of training sets, coloured by the label used for training."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.5), squeeze=False)
    for ax, (name, (x, y)) in zip(axes[0], sets.items()):
        emb = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(np.abs(x))
        sns.scatterplot(x=emb[:, 0], y=emb[:, 1], hue=np.where(y == 1, "9 (label 1)", "1 (label 0)"), s=12, ax=ax)
        ax.set(title=name.replace("_", " "), xlabel="t-SNE 1 (arbitrary units)", ylabel="t-SNE 2 (arbitrary units)")
    fig.tight_layout()
    return fig


def xxz_observable_figure(deltas, structure_factor, labels):
    """The XXZ dataset: staggered structure factor of each ground state against the anisotropy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(x=deltas, y=structure_factor, hue=np.where(labels == 1, "Néel (Δ > 1)", "XY (Δ < 1)"), ax=ax)
    ax.axvline(1.0, color="grey", ls=":")
    ax.set(xlabel="anisotropy Δ (units of the XY coupling)",
           ylabel="staggered structure factor S_zz(π) (dimensionless)",
           title="XXZ ground states")
    return fig


# ------------------------------------------------------------------------------------- Hessian
def trace_ratios(df):
    """trace(noisy) / trace(clean) of the same model and seed, for every alpha > 0."""
    clean = df[df["alpha"] == 0].set_index(["model", "arch", "seed"])["trace"]
    noisy = df[df["alpha"] > 0].copy()
    same_run = list(zip(noisy["model"], noisy["arch"], noisy["seed"]))
    noisy["ratio"] = noisy["trace"].to_numpy() / clean.loc[same_run].to_numpy()
    return noisy


def trace_ratio_figure(df):
    """Bar chart of trace(noisy)/trace(clean) vs alpha, mean +- std over seeds, per model."""
    ratios = trace_ratios(df)
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.barplot(data=ratios.assign(model=ratios["model"].map(MODEL_NAMES)), x="alpha", y="ratio", hue="model",
                errorbar="sd", ax=ax)
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="label-flip ratio α", ylabel="Hessian trace ratio noisy / clean (dimensionless)")
    return fig


def density_figure(spectra, df, density, sigma_fraction=0.01):
    """Spectral density of the Hessian (log scale), clean vs noisy, one panel per model."""
    pairs = list(dict.fromkeys(zip(df["model"], df["arch"])))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (model, arch) in zip(axes[0], pairs):
        rows = df[(df["model"] == model) & (df["arch"] == arch)]
        keys = [f"{model}_{arch}_alpha{r.alpha}_seed{r.seed}" for r in rows.itertuples()]
        lo = min(spectra[k + "_nodes"].min() for k in keys)
        hi = max(spectra[k + "_nodes"].max() for k in keys)
        grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 600)
        peak = 0.0
        for alpha in sorted(rows["alpha"].unique()):
            curves = [density(spectra[k + "_nodes"], spectra[k + "_weights"], grid, sigma_fraction * (hi - lo))
                      for k, a in zip(keys, rows["alpha"]) if a == alpha]
            ax.plot(grid, np.mean(curves, axis=0), label=f"α = {alpha}")
            peak = max(peak, np.mean(curves, axis=0).max())
        ax.set(yscale="log", ylim=(1e-6, 3 * peak), title=f"{MODEL_NAMES[model]} {arch}",
               xlabel="Hessian eigenvalue (loss units per parameter²)", ylabel="spectral density (1 / eigenvalue unit)")
        ax.legend()
    fig.tight_layout()
    return fig
