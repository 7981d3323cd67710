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
MODEL_NAMES = {"qnn": "QNN", "mlp": "MLP", "observable": "observable"}


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
    recipe = "" if row.get("recipe", "plain") == "plain" else f" {row['recipe']}"
    return f"{MODEL_NAMES[row['model']]} {row['arch']}{recipe}, {POISON_NAMES[row['poison']]} α={row['alpha']}"


STUDY = ["model", "arch", "recipe", "poison", "alpha"]


def final_rows(unlearn):
    """The rows of each study's last unlearning epoch (studies may unlearn for different numbers of epochs)."""
    return unlearn[unlearn["epoch"] == unlearn.groupby(STUDY)["epoch"].transform("max")]


def poison_removed(final, unlearn, start="finetune"):
    """``final`` with ``poison_removed`` = 1 - forget_poison_acc / the teacher's: the fraction of the poison the
    teacher held that a method removed (a teacher that never held the poison has nothing to remove). The teacher's
    value is epoch 0 of ``start``, a method that begins at the teacher."""
    keys = [*STUDY, "run"]
    teacher = (unlearn[(unlearn["method"] == start) & (unlearn["epoch"] == 0)].set_index(keys)["forget_poison_acc"]
               .rename("teacher_fpa"))
    out = final.join(teacher, on=keys)
    return out.assign(poison_removed=1 - out["forget_poison_acc"] / out["teacher_fpa"])


def method_palette(names):
    return dict(zip(names, sns.color_palette("tab20", len(names))))


def unlearn_figure(df, metrics=("val_acc", "forget_poison_acc")):
    """Validation and forgetting accuracy vs unlearning epoch, one line per method (+- std band)."""
    df = df.assign(study=df.apply(study_name, axis=1))
    names = list(dict.fromkeys(df["study"]))
    palette = method_palette(list(dict.fromkeys(df["method"])))
    labels = {"val_acc": "validation accuracy", "forget_poison_acc": "forget-set accuracy\n(poisoned labels)",
              "forget_acc": "forget-set accuracy\n(clean labels)", "retain_acc": "retain accuracy",
              "oracle_agree": "agreement with retrain\n(validation predictions)"}
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(5 * len(names) + 2, 3.6 * len(metrics)),
                             squeeze=False, sharex="col")
    for j, name in enumerate(names):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            sns.lineplot(data=df[df["study"] == name], x="epoch", y=metric, hue="method", palette=palette,
                         errorbar="sd", ax=ax, legend=(i == 0 and j == len(names) - 1))
            ax.set(title=name if i == 0 else "", xlabel="unlearning epoch", ylabel=f"{labels[metric]} (fraction)",
                   ylim=(-0.02, 1.02))
    if axes[0, -1].get_legend():
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig


def sweep_figure(df):
    """The paper's weight sweeps, final validation accuracy: SCRUB heatmap over (kl_w, fo_w) and gradient ascent
    vs fo_w, one column per study."""
    df = df[df["sweep"] == "weights"].assign(study=lambda d: d.apply(study_name, axis=1))
    studies = list(dict.fromkeys(df["study"]))
    fig, axes = plt.subplots(2, max(len(studies), 1), figsize=(5.5 * max(len(studies), 1), 9), squeeze=False)
    for j, name in enumerate(studies):
        scrub = df[(df["study"] == name) & (df["method"] == "scrub")]
        if len(scrub):
            grid = scrub.pivot_table(index="kl_w", columns="fo_w", values="val_acc", aggfunc="mean")
            sns.heatmap(grid, ax=axes[0, j], vmin=0, vmax=1, cmap="viridis", annot=grid.shape[1] <= 10, fmt=".2f",
                        cbar_kws={"label": "final validation accuracy (fraction)"})
            axes[0, j].invert_yaxis()
        axes[0, j].set(title=f"{name}\nSCRUB", xlabel="forget weight fo_w", ylabel="KL weight kl_w")
        ascent = df[(df["study"] == name) & (df["method"] == "grad_ascent")]
        long = ascent.melt(id_vars=["fo_w", "run"], value_vars=["val_acc", "forget_poison_acc"], var_name="metric",
                           value_name="accuracy")
        if len(long):
            sns.lineplot(data=long, x="fo_w", y="accuracy", hue="metric", marker="o", errorbar="sd", ax=axes[1, j])
        axes[1, j].set(title="gradient ascent", xlabel="forget weight fo_w", ylabel=ACC, ylim=(-0.02, 1.02))
    fig.tight_layout()
    return fig


LOG_PARAMS = ("damping", "noise", "lr")


def hparam_sweep_figure(df):
    """Each field method's final validation and poisoned-label forget accuracy against its key hyper-parameter,
    one panel per (method, model)."""
    df = df[df["sweep"] == "hparam"].assign(study=lambda d: d.apply(study_name, axis=1))
    panels = list(dict.fromkeys(zip(df["method"], df["study"])))
    fig, axes = plt.subplots(-(-len(panels) // 4) or 1, 4, figsize=(18, 3.8 * (-(-len(panels) // 4) or 1)),
                             squeeze=False)
    for ax, (method, study) in zip(axes.flat, panels):
        part = df[(df["method"] == method) & (df["study"] == study)]
        long = part.melt(id_vars=["value", "run"], value_vars=["val_acc", "forget_poison_acc"], var_name="metric",
                         value_name="accuracy")
        sns.lineplot(data=long, x="value", y="accuracy", hue="metric", marker="o", errorbar="sd", ax=ax)
        param = part["param"].iloc[0]
        ax.set(title=f"{method}: {study}", ylabel=ACC, ylim=(-0.02, 1.02),
               xlabel=f"{param} (dimensionless)", xscale="log" if param in LOG_PARAMS else "linear")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def lr_sweep_figure(df):
    """Learning-rate sensitivity: final validation accuracy and poisoned-label forget accuracy of every method
    (rows) at each learning rate (columns, as a multiple of the study's rate), one column of panels per study."""
    df = df[df["sweep"] == "lr"].assign(study=lambda d: d.apply(study_name, axis=1))
    base = df.groupby("study")["lr"].transform("median")
    df = df.assign(factor=(df["lr"] / base).round(3))
    studies = list(dict.fromkeys(df["study"]))
    order = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(2, max(len(studies), 1), figsize=(4.6 * max(len(studies), 1), 11), squeeze=False)
    for j, name in enumerate(studies):
        for i, (metric, label) in enumerate((("val_acc", "final validation accuracy (fraction)"),
                                             ("forget_poison_acc", "forget-set accuracy, poisoned labels (fraction)"))):
            grid = df[df["study"] == name].pivot_table(index="method", columns="factor", values=metric, aggfunc="mean")
            sns.heatmap(grid.reindex([m for m in order if m in grid.index]), ax=axes[i, j], vmin=0, vmax=1,
                        cmap="viridis", annot=True, fmt=".2f", cbar_kws={"label": label})
            axes[i, j].set(title=name if i == 0 else "", xlabel="learning rate / the study's rate", ylabel="method")
    fig.tight_layout()
    return fig


def audit_figure(df):
    """Membership inference (AUC) and U-LiRA (balanced accuracy) per method, mean +- std over shadow runs, with
    the teacher's (no unlearning) and retraining's levels as reference lines; one column per study."""
    df = df.assign(study=df.apply(study_name, axis=1))
    studies = list(dict.fromkeys(df["study"]))
    fig, axes = plt.subplots(2, max(len(studies), 1), figsize=(6 * max(len(studies), 1), 9), squeeze=False)
    for j, name in enumerate(studies):
        part = df[df["study"] == name]
        for i, (metric, label) in enumerate((("mia_auc", "membership-inference AUC (0.5 = no leak)"),
                                             ("ulira_acc", "U-LiRA accuracy (0.5 = like retraining)"))):
            ax = axes[i, j]
            sns.barplot(data=part, y="method", x=metric, errorbar="sd", ax=ax, color="tab:blue")
            for ref, style in (("teacher", "--"), ("retrain", ":")):
                level = part.loc[part["method"] == ref, metric].mean()
                ax.axvline(level, color="black", ls=style, lw=1, label=f"{ref}: {level:.2f}")
            ax.axvline(0.5, color="grey", lw=0.5)
            ax.set(title=name if i == 0 else "", xlabel=f"{label} (fraction)", ylabel="method", xlim=(0, 1.02))
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


CRITICAL_ACC = 0.75  # the critical alpha: the first alpha where the mean validation accuracy falls below this


def with_paper_models(controls, phase):
    """The controls table with the paper's QNN and MLP from ``phase`` (recipe "paper") on the same poisons, gauges
    and range of alpha, and each row's readable ``control`` name."""
    if phase is not None:
        keep = (phase["poison"].isin(set(controls["poison"])) & phase["gauge"].isin(set(controls["gauge"]))
                & (phase["alpha"] <= controls["alpha"].max()))
        paper = phase[keep].assign(recipe="paper", params=np.nan, choice="")
        controls = pd.concat([paper, controls], ignore_index=True)
    gauge = variant(controls).str.partition(",")[2]
    return controls.assign(control=controls["model"] + " " + controls["arch"] + " " + controls["recipe"] + gauge)


def controls_figure(df):
    """Validation accuracy (clean) and the fitted fraction of the poison vs alpha for every control, mean +- std
    over runs: one column per poison."""
    poisons = [p for p in POISON_NAMES if p in set(df["poison"])]
    names = list(dict.fromkeys(df["control"]))
    palette = dict(zip(names, sns.color_palette("tab20", len(names))))
    fig, axes = plt.subplots(2, len(poisons), figsize=(7 * len(poisons) + 3, 8), squeeze=False, sharex=True)
    for j, poison in enumerate(poisons):
        part = df[df["poison"] == poison]
        for i, (metric, label) in enumerate((("val_acc", "validation accuracy (clean, fraction)"),
                                             ("flip_fit", "poisoned rows fitted (flip_fit, fraction)"))):
            ax = axes[i, j]
            sns.lineplot(data=part, x="alpha", y=metric, hue="control", palette=palette, style="model",
                         markers=True, errorbar="sd", ax=ax, legend=(i == 0 and j == len(poisons) - 1))
            ax.set(title=POISON_NAMES[poison] if i == 0 else "", xlabel="poisoning ratio α", ylabel=label,
                   ylim=(-0.02, 1.02))
            ax.axhline(CRITICAL_ACC if metric == "val_acc" else 0.5, color="grey", lw=0.5, ls=":")
    if axes[0, -1].get_legend():
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig


def memorise_figure(df):
    """Training accuracy reached on uniformly random labels vs the number of training states."""
    df = df.assign(model_arch=df["model"] + " " + df["arch"] + " (" + df["params"].astype(str) + " parameters)")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=df, x="n_train", y="random_fit", hue="model_arch", markers=True, style="model_arch",
                 errorbar="sd", ax=ax)
    ax.set(xscale="log", xlabel="training states with random labels (count)",
           ylabel="training accuracy on random labels (fraction)", ylim=(0.4, 1.02))
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    return fig


def controls_summary(controls, memorise=None, *, alpha=0.3):
    """One line per control: trained parameters, validation accuracy and flip_fit at ``alpha`` (mean +- std over
    runs), the critical alpha, and the random labels fitted at the memorisation size nearest 20 and the largest."""
    by = ["poison", "control"]
    at = controls[np.isclose(controls["alpha"], alpha)].groupby(by, sort=False)
    out = pd.DataFrame({"params": at["params"].first(),
                        f"val_acc at α={alpha}": at["val_acc"].mean().round(3).astype(str) + " ± "
                        + at["val_acc"].std().round(3).astype(str),
                        f"flip_fit at α={alpha}": at["flip_fit"].mean().round(3)})
    curve = controls.groupby([*by, "alpha"], sort=False)["val_acc"].mean().reset_index()
    below = curve[curve["val_acc"] < CRITICAL_ACC].groupby(by, sort=False)["alpha"].min()
    out["critical α"] = below.reindex(out.index)
    if memorise is not None:  # the random-label test of each paper model and plain control (in the study's gauge)
        model_arch = [tuple(name.split(" ")[:2]) for name in out.index.get_level_values("control")]
        plain = [name.split(" ")[2:] in (["paper"], ["plain"]) for name in out.index.get_level_values("control")]
        params = memorise.groupby(["model", "arch"])["params"].first()
        out["params"] = out["params"].fillna(pd.Series([params.get(k, np.nan) for k in model_arch], out.index))
        sizes = sorted(set(memorise["n_train"]))
        for n in dict.fromkeys((min(sizes, key=lambda s: abs(s - 20)), max(sizes))):
            fit = memorise[memorise["n_train"] == n].groupby(["model", "arch"])["random_fit"].mean()
            out[f"random_fit n={n}"] = [fit.get(k, np.nan) if p else np.nan for k, p in zip(model_arch, plain)]
    return out


def device_name(df):
    """Each row's device point: noise profile and shots per output."""
    shots = df["shots"].astype(str).map(lambda s: "exact" if s == "exact" else f"{s} shots")
    return df["noise"].astype(str) + " noise, " + shots


def device_phase_figure(df):
    """The QNN's clean validation accuracy vs alpha under label flipping, one line per device point."""
    df = df.assign(device=device_name(df))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.lineplot(data=df, x="alpha", y="val_acc", hue="device", style="device", markers=True, errorbar="sd", ax=ax)
    ax.set(xlabel="poisoning ratio α (label flipping)", ylabel="validation accuracy (clean, fraction)",
           ylim=(-0.02, 1.02), title=f"QNN {df['arch'].iloc[0]} on a device")
    ax.axhline(CRITICAL_ACC, color="grey", lw=0.5, ls=":")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig


def device_unlearn_figure(df):
    """Final validation and forget-set (poisoned-label) accuracy of each method at each device point."""
    final = final_rows(df).assign(device=device_name(df))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], (("val_acc", "validation accuracy (clean, fraction)"),
                                             ("forget_poison_acc", "forget set, poisoned labels (fraction)"))):
        sns.barplot(data=final, x="method", y=metric, hue="device", errorbar="sd", ax=ax)
        ax.set(xlabel="unlearning method", ylabel=label, ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def device_audit_figure(df):
    """Membership-inference AUC and U-LiRA accuracy vs shots per output (no gate noise), per method."""
    df = df.assign(shots=df["shots"].astype(str))
    order = sorted(set(df["shots"]), key=lambda s: float("inf") if s == "exact" else -float(s))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, (metric, label) in zip(axes[0], (("mia_auc", "membership-inference AUC (0.5 = no leak)"),
                                             ("ulira_acc", "U-LiRA accuracy (0.5 = like retraining)"))):
        sns.pointplot(data=df, x="shots", y=metric, hue="method", order=order, errorbar="sd", dodge=0.3, ax=ax)
        ax.set(xlabel="shots per output (exact: the expectation)", ylabel=f"{label} (fraction)", ylim=(0, 1.02))
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    return fig


def device_summary(phase, unlearn, audit=None, *, alpha=0.3):
    """One line per device point: the critical alpha and validation accuracy at ``alpha`` of the QNN's sweep, the
    teacher's and finetuning's forget-set accuracy (poisoned labels), and the teacher's and finetuning's
    membership-inference AUC (where the audit has the point)."""
    by = ["noise", "shots"]
    phase = phase.assign(shots=phase["shots"].astype(str))
    curve = phase.groupby([*by, "alpha"], sort=False)["val_acc"].mean().reset_index()
    out = pd.DataFrame({"critical α": curve[curve["val_acc"] < CRITICAL_ACC].groupby(by, sort=False)["alpha"].min(),
                        f"val_acc at α={alpha}": curve[np.isclose(curve["alpha"], alpha)].set_index(by)["val_acc"]})
    final = final_rows(unlearn).assign(shots=lambda d: d["shots"].astype(str))
    teacher = unlearn[(unlearn["method"] == "finetune") & (unlearn["epoch"] == 0)].assign(
        shots=lambda d: d["shots"].astype(str))
    out["teacher fpa"] = teacher.groupby(by)["forget_poison_acc"].mean()
    for method in ("finetune", "retrain"):
        out[f"{method} fpa"] = final[final["method"] == method].groupby(by)["forget_poison_acc"].mean()
    if audit is not None:
        audit = audit.assign(shots=audit["shots"].astype(str))
        for method in ("teacher", "finetune"):
            out[f"{method} MIA AUC"] = audit[audit["method"] == method].groupby(by)["mia_auc"].mean()
    return out.round(3)


FIGURES = {"phase": {"phase": phase_figure}, "controls": {"controls": controls_figure},
           "memorise": {"memorise": memorise_figure}, "unlearn": {"unlearn": unlearn_figure},
           "sweep": {"sweep": sweep_figure, "sweep_hparams": hparam_sweep_figure, "sweep_lr": lr_sweep_figure},
           "audit": {"audit": audit_figure}, "device_phase": {"device": device_phase_figure},
           "device_unlearn": {"device_unlearn": device_unlearn_figure}, "device_audit": {"device_audit": device_audit_figure}}
PREPARE = {"controls": lambda df, out: with_paper_models(df, read_if_present(Path(out) / "phase.csv"))}
"""A part whose figure reads more than its own table: how its table is completed (e.g. controls beside phase)."""


def save(fig, folder, name):
    """Write ``name``.png and ``name``.pdf into ``folder`` (created if needed); returns the PNG path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return folder / f"{name}.png"


def read_table(path):
    return pd.read_csv(path, keep_default_na=False, na_values=["nan", ""])


def read_if_present(path):
    return read_table(path) if Path(path).exists() else None


def save_part_figure(out, part, csv_path):
    """Redraw the figures of one part of a results folder from its CSV; returns the first PNG path."""
    if part not in FIGURES or not Path(csv_path).exists():
        return None
    df = PREPARE.get(part, lambda df, out: df)(read_table(csv_path), out)
    paths = [save(draw(df), Path(out) / "figures", name) for name, draw in FIGURES[part].items()]
    return paths[0]


def fidelity_figure(phases):
    """Resilience curves under each set of definitions: ``phases`` maps a fidelity name to a phase.csv table.
    Validation accuracy vs alpha, one panel per (model variant, poison); do the findings survive the repairs?"""
    df = pd.concat([d.assign(fidelity=name) for name, d in phases.items()])
    df = df.assign(variant=df["model"].map(MODEL_NAMES) + " " + variant(df))
    panels = list(dict.fromkeys(zip(df["variant"], df["poison"])))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (var, poison) in zip(axes.flat, panels):
        sns.lineplot(data=df[(df["variant"] == var) & (df["poison"] == poison)], x="alpha", y="val_acc",
                     hue="fidelity", style="fidelity", markers=True, errorbar="sd", ax=ax)
        ax.set(title=f"{var}\n{POISON_NAMES[poison]}", xlabel="poisoning ratio α",
               ylabel="clean validation accuracy (fraction)", ylim=(-0.02, 1.02))
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    fig.tight_layout()
    return fig


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
COLLAPSED_TRACE = 0.25  # a ReLU net with every hidden unit dead: only the output bias acts, trace = p(1-p) = 0.25


def trace_ratios(df, how="per_seed"):
    """trace(noisy) / trace(clean) for every alpha > 0 (fidelity item g).

    ``"per_seed"``: against the clean run of the same model and seed. ``"mean_clean"`` (the authors'): against
    the mean clean trace over seeds, after dropping collapsed runs (trace within 0.01 of 0.25) everywhere.
    """
    if how == "mean_clean":
        kept = df[(df["trace"] - COLLAPSED_TRACE).abs() >= 0.01]
        clean = kept[kept["alpha"] == 0].groupby(["model", "arch"])["trace"].mean()
        noisy = kept[kept["alpha"] > 0].copy()
        noisy["ratio"] = noisy["trace"].to_numpy() / clean.loc[list(zip(noisy["model"], noisy["arch"]))].to_numpy()
        return noisy
    clean = df[df["alpha"] == 0].set_index(["model", "arch", "seed"])["trace"]
    noisy = df[df["alpha"] > 0].copy()
    same_run = list(zip(noisy["model"], noisy["arch"], noisy["seed"]))
    noisy["ratio"] = noisy["trace"].to_numpy() / clean.loc[same_run].to_numpy()
    return noisy


def trace_ratio_figure(df, how="per_seed"):
    """Bar chart of trace(noisy)/trace(clean) vs alpha, mean +- std over seeds, per model."""
    ratios = trace_ratios(df, how)
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
