"""Where CCA stops, and how it compares beyond FID: two studies of a run folder, and a plot.

    python tools/diagnose.py tilt RUN_DIR --dataset cifar10 [--per-class 100]
    python tools/diagnose.py compare RUN_DIR --dataset cifar10 [--per-class 500] [--cfg 2 4 8 10]
    python tools/diagnose.py frontier RUN_DIR/compare.json [--figure frontier.png]

`tilt` asks what a CCA fine-tune learned. Its policy p_θ and the frozen reference p_φ (the base
model) give, for an image x of class c, the learned log-ratio  Δ(x, c) = log p_θ(x|c) − log p_φ(x|c)
(sums over the N tokens). The base model's implicit classifier gives the tilt the theory asks for:
    r(x, c) = log p_φ(x|c) − log p_φ(x)      (≈ log p(c|x) − log p(c))
with p_φ(x) either the null branch (what CFG divides by) or the mixture (1/K) Σ_c' p_φ(x|c')
(the Bayes estimate, calibrated by construction). At CCA's optimum β·Δ = r − log λ + (a constant
per class), so within a class Δ rises with r at slope 1/β; CFG at scale w = 1 + s tilts a
sequence by about s·r_null (per-token normalisers aside). The slope fitted within classes is the
tilt the fine-tune reached, and R² says how much of Δ that tilt explains. The same fit on the CFG
sampler's own log-likelihood (the base model under CFG at each `--cfg` scale, teacher-forced)
places CCA on CFG's scale.
Training and held-out images side by side tell "not converged" (both slopes well below 1/β, equal)
from "memorised" (train above held-out); a low R² says Δ is not a tilt by r.

`compare` samples `--per-class` images per class for the base model at each `--cfg` scale and for
every CCA checkpoint without guidance, and reports FID, accuracy, precision and recall in the
judge's features (as the run's table does) and the intra-class FID: FID per class against that
class's test images, averaged over the classes (the metric class-conditional models report because
overall FID rewards a sampler that covers the classes but not the images within them). It names the
CFG scale whose recall is closest to each CCA model's, beside the best-FID scale. With `--sets S`
each row is the mean ± std over S sets of samples (sampling seeds seed .. seed + S - 1).

`frontier` plots FID against recall from compare's JSON: the CFG scales as one curve (the trade
guidance makes), each fine-tune as a point; a fine-tune below and right of the curve beats guidance.

Both studies print a table and write JSON beside the run (tilt.json, compare.json; --json).
Maintainer tools: they import minicca and need no other file.
"""
import argparse
import glob
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minicca  # noqa: E402


@torch.no_grad()
def class_logprobs(model, tokens, num_classes, batch=500):
    """log p(x|c') for every class c' and the null class (last column): tokens (n, N) -> (n, K + 1),
    in nats, float32."""
    columns = []
    for c in range(num_classes + 1):
        parts = []
        for x in tokens.split(batch):
            labels = torch.full((len(x),), c, device=x.device)
            parts.append(minicca.sequence_logprob(model(x, labels), x))
        columns.append(torch.cat(parts))
    return torch.stack(columns, 1)


def implicit_ratios(logp, labels):
    """(n, K + 1) log-likelihoods and true labels (n,) -> (r_null, r_bayes), each (n,): the true
    class's log-likelihood minus the null branch's, and minus log of the mean over the K classes."""
    K = logp.size(1) - 1
    own = logp[torch.arange(len(labels)), labels]
    mixture = torch.logsumexp(logp[:, :K], 1) - math.log(K)
    return own - logp[:, K], own - mixture


@torch.no_grad()
def learned_log_ratio(policy, reference, tokens, labels, batch=500):
    """Δ(x, c) = log p_θ(x|c) − log p_φ(x|c): (n,). Exactly 0 when the policy is the reference."""
    parts = []
    for x, y in zip(tokens.split(batch), labels.split(batch)):
        policy_logp = minicca.sequence_logprob(policy(x, y), x)
        reference_logp = minicca.sequence_logprob(reference(x, y), x)
        parts.append(policy_logp - reference_logp)
    return torch.cat(parts)


def within_class_fit(delta, r, labels):
    """Least squares of Δ on r with one intercept per class: returns (slope, r2). r2 is the share of
    Δ's within-class variance that the slope explains (0 when Δ is constant within classes)."""
    d = delta.double().clone()
    x = r.double().clone()
    for c in labels.unique():
        rows = labels == c
        d[rows] -= d[rows].mean()
        x[rows] -= x[rows].mean()
    slope = float((d * x).sum() / (x * x).sum().clamp(min=1e-12))
    total = float((d * d).sum())
    residual = float(((d - slope * x) ** 2).sum())
    return slope, (1.0 - residual / total) if total > 0 else 0.0


class GuidedModel(torch.nn.Module):
    """The base model under CFG at scale w, as a model: forward(tokens, labels) returns the logits
    the CFG sampler draws from, l_u + w (l_c - l_u), so its teacher-forced log-likelihood is the
    sampler's own (per-token normalisers included) and `tilt_rows` can place CFG beside CCA."""

    def __init__(self, base, scale):
        super().__init__()
        self.base = base
        self.scale = scale

    def forward(self, tokens, labels):
        null = torch.full_like(labels, self.base.config.num_classes)
        return minicca.cfg_logits(self.base(tokens, labels), self.base(tokens, null), self.scale)


def tilt_rows(policy, reference, tokens, labels, num_classes):
    """The diagnostic on one image set: {slope and r2 of Δ on r_null and on r_bayes, mean Δ}."""
    logp = class_logprobs(reference, tokens, num_classes)
    r_null, r_bayes = implicit_ratios(logp, labels)
    delta = learned_log_ratio(policy, reference, tokens, labels)
    slope_null, r2_null = within_class_fit(delta, r_null, labels)
    slope_bayes, r2_bayes = within_class_fit(delta, r_bayes, labels)
    return {"n": len(labels), "mean_delta": float(delta.mean()), "slope_null": slope_null,
            "r2_null": r2_null, "slope_bayes": slope_bayes, "r2_bayes": r2_bayes,
            "mean_r_bayes": float(r_bayes.mean()), "mean_r_null": float(r_null.mean())}


def balanced_subset(y, per_class, seed):
    """The first `per_class` indices of each class after one seeded shuffle, class by class."""
    order = np.random.default_rng(seed).permutation(len(y))
    picked = [order[y[order] == c][:per_class] for c in np.unique(y)]
    return np.concatenate(picked)


def load_run(run_dir, dataset, data_root, checkpoints="cca_*.pt"):
    """The run's tokenizer, base GPT, its CCA checkpoints (a glob in the folder) and the data."""
    tk = minicca.load_checkpoint(os.path.join(run_dir, "tokenizer.pt"))
    tokenizer = minicca.VQTokenizer(minicca.VQConfig(**tk["vq_config"])).eval()
    tokenizer.load_state_dict(tk["model"])
    base = minicca.load_gpt(minicca.load_checkpoint(os.path.join(run_dir, "gpt.pt")), "cpu")
    tuned = {}
    for path in sorted(glob.glob(os.path.join(run_dir, checkpoints))):
        ckpt = minicca.load_checkpoint(path)
        tuned[os.path.basename(path)] = (minicca.load_gpt(ckpt, "cpu"), ckpt["config"])
    data = minicca.load_dataset(dataset, data_root)
    return tokenizer, base, tuned, data


@torch.no_grad()
def encode(tokenizer, images, batch=500):
    parts = [tokenizer.encode(minicca.to_float(images[i:i + batch])).flatten(1)
             for i in range(0, len(images), batch)]
    return torch.cat(parts)


def tilt(args):
    tokenizer, base, tuned, data = load_run(args.run_dir, args.dataset, args.data_root,
                                            args.checkpoints)
    K = len(data["classes"])
    out = {}
    for split in ("test", "train"):
        idx = balanced_subset(data[f"y_{split}"], args.per_class, args.seed)
        tokens = encode(tokenizer, data[f"x_{split}"][idx])
        labels = torch.from_numpy(data[f"y_{split}"][idx]).long()
        models = [(f"CFG w = {w:g}", GuidedModel(base, w), None) for w in args.cfg]
        models += [(name, model, settings) for name, (model, settings) in tuned.items()]
        for name, model, settings in models:
            row = tilt_rows(model, base, tokens, labels, K)
            row["split"] = split
            target = ""
            if settings is not None:
                row.update(beta=settings["beta"], lam=settings["lam"])
                target = f"  optimum 1/β = {1 / settings['beta']:.3g}"
            out[f"{name} {split}"] = row
            print(f"{name:32s} {split:5s} n {row['n']:5d}  mean Δ {row['mean_delta']:7.2f}  "
                  f"slope on r_null {row['slope_null']:5.2f} (R² {row['r2_null']:.2f})  "
                  f"on r_bayes {row['slope_bayes']:5.2f} (R² {row['r2_bayes']:.2f}){target}",
                  flush=True)
    with open(os.path.join(args.run_dir, args.json), "w") as f:
        json.dump(out, f, indent=1)


def per_class_fid(features, labels, real_features, real_labels):
    """FID of each class's samples against that class's real images, averaged over the classes."""
    fids = [minicca.fid_from_features(features[labels == c], real_features[real_labels == c])
            for c in labels.unique()]
    return float(np.mean(fids))


def compare(args):
    tokenizer, base, tuned, data = load_run(args.run_dir, args.dataset, args.data_root,
                                            args.checkpoints)
    K = len(data["classes"])
    name = minicca.dataset_name(args.dataset)  # the shipped judge: MNIST's for the tiny subset
    judge = minicca.load_judge(args.judge or ("mnist" if name == "tiny" else name))
    real, _ = minicca.classify(judge, data["x_test"], "cpu")
    real_labels = torch.from_numpy(data["y_test"]).long()
    settings = {**minicca.COMMON, **minicca.PRESETS[args.preset]}
    grid = (data["x_train"].shape[1] // 4, data["x_train"].shape[2] // 4)
    labels = minicca.balanced_labels(args.per_class * K, K)
    models = [(f"base, CFG {w:g}" if w != 1 else "base, no guidance", base, w) for w in args.cfg]
    models += [(f"{name}, no guidance", model, 1.0) for name, (model, _) in tuned.items()]
    rows = {}
    for name, model, w in models:
        sets = []
        for seed in range(args.seed, args.seed + args.sets):  # sampling seeds, as the table's
            images, _ = minicca.sample_images(model, tokenizer, labels, w, grid, settings,
                                              torch.device("cpu"), seed)
            scores = minicca.evaluate(images, labels, judge, real, "cpu")
            features, _ = minicca.classify(judge, images, "cpu")
            scores["intra_fid"] = per_class_fid(features, labels, real, real_labels)
            sets.append(scores)
        rows[name] = {"cfg": w, **minicca.mean_and_std(sets)}
        cells = [f"{m} {minicca.format_metric(m, rows[name][m], rows[name][f'{m}_std'])}"
                 for m in METRICS]
        print(f"{name:44s} " + "  ".join(cells), flush=True)
    cfg_rows = {n: r for n, r in rows.items() if n.startswith("base")}
    if cfg_rows:
        best = min(cfg_rows, key=lambda n: cfg_rows[n]["fid"])
        print(f"best-FID CFG row: {best}")
        for name, row in rows.items():
            if not name.startswith("base"):
                matched = min(cfg_rows, key=lambda n: abs(cfg_rows[n]["recall"] - row["recall"]))
                print(f"{name}: CFG row with the closest recall: {matched}")
    with open(os.path.join(args.run_dir, args.json), "w") as f:
        json.dump(rows, f, indent=1)


METRICS = ["accuracy", "fid", "intra_fid", "precision", "recall"]


def frontier(args):
    """FID against recall: the base model's CFG scales as one curve, each fine-tune as a point,
    from the JSON files `compare` wrote (every row of every file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {}
    for path in args.json_files:
        with open(path) as f:
            rows.update(json.load(f))
    cfg = sorted((r["cfg"], r) for n, r in rows.items() if n.startswith("base"))
    tuned = [(n.split(", ")[0], r) for n, r in rows.items() if not n.startswith("base")]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.errorbar([r["recall"] for _, r in cfg], [r["fid"] for _, r in cfg],
                xerr=[r.get("recall_std") or 0 for _, r in cfg],
                yerr=[r.get("fid_std") or 0 for _, r in cfg], fmt="o-", color="tab:blue",
                label="base model, CFG scale w")
    for w, r in cfg:
        ax.annotate(f"w={w:g}", (r["recall"], r["fid"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color="tab:blue")
    crowded = len(tuned) > 6  # more labels than fit beside their points: a column of them
    fids = [r["fid"] for _, r in tuned] or [0.0]
    left = min((r["recall"] - (r.get("recall_std") or 0) for _, r in tuned), default=0.0)
    order = (lambda t: -t[1]["fid"]) if crowded else (lambda t: t[1]["recall"])
    for i, (name, r) in enumerate(sorted(tuned, key=order)):
        ax.errorbar(r["recall"], r["fid"], xerr=r.get("recall_std") or 0,
                    yerr=r.get("fid_std") or 0, fmt="s", color="tab:red")
        if crowded:  # left of the points, top to bottom in FID's order, a line to each point
            y = max(fids) - i * (max(fids) - min(fids)) / (len(tuned) - 1)
            ax.annotate(tuned_label(name), (r["recall"], r["fid"]), xytext=(left - 0.01, y),
                        ha="right", va="center", fontsize=7, color="tab:red",
                        arrowprops=dict(arrowstyle="-", color="tab:red", lw=0.5, alpha=0.6))
        else:  # beside the point, above and below in turn
            ax.annotate(tuned_label(name), (r["recall"], r["fid"]), textcoords="offset points",
                        xytext=(4, -11 if i % 2 else 5), fontsize=8, color="tab:red")
    ax.plot([], [], "s", color="tab:red", label="CCA fine-tunes, no guidance")
    ax.set_xlabel("recall (higher: samples cover more of the data)")
    ax.set_ylabel("FID in the judge's features (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    print(f"wrote {args.figure}")


def tuned_label(checkpoint):
    """'cca_cca_b0.1_l30_e0.5.pt' -> 'λ30, 0.5 ep'; a schedule's peak ('_lr3e-4w0.05f0.1') and
    a batch of its own ('_bs256') are added to the label."""
    words = checkpoint.removesuffix(".pt").split("_")[2:]
    extras = [w for w in words if w.startswith(("lr", "bs"))]
    parts = dict((w[0], w[1:]) for w in words if w not in extras)
    label = f"λ{parts.get('l', '?')}, {parts.get('e', '?')} ep"
    if parts.get("b") != "0.1":
        label += f", β{parts.get('b')}"
    for extra in extras:  # lr<peak>w<warm-up>f<floor>, bs<batch>
        is_rate = extra.startswith("lr")
        label += f", peak {extra[2:].split('w')[0]}" if is_rate else f", batch {extra[2:]}"
    return label


def seeds(args):
    """Runs of one recipe with other training seeds: each run's row means (its metrics.json), then
    their mean ± std over the runs, as a markdown table. The best-CFG rows are matched by position
    (each run picks its own scale; the label lists them)."""
    runs = []
    for path in args.metrics:
        with open(path) as f:
            runs.append(json.load(f))
    names = list(runs[0]["rows"])
    columns = ["accuracy", "fid", "is", "precision", "recall"]
    print("| setting | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    table = {}
    for i, name in enumerate(names):
        rows = [list(run["rows"].values())[i] for run in runs]
        label = name
        if name.startswith("base, best CFG"):
            scales = ", ".join(f"{run['best_cfg']:g}" for run in runs)
            label = f"base, best CFG (w = {scales})"
        table[label] = minicca.mean_and_std([{m: row[m] for m in columns} for row in rows])
        cells = [minicca.format_metric(m, table[label][m], table[label][f"{m}_std"])
                 for m in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    studies = parser.add_subparsers(dest="study", required=True)
    for study in ("tilt", "compare"):
        sub = studies.add_parser(study, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("run_dir", help="a finished run's --out folder")
        sub.add_argument("--dataset", default=None, help="the run's --dataset")
        sub.add_argument("--data-root", default="data")
        sub.add_argument("--per-class", type=int, default=None,
                         help="images per class (tilt: 100 real; compare: 500 samples)")
        sub.add_argument("--cfg", type=float, nargs="*", default=None,
                         help="the base model's CFG scales (tilt: 2 4 10; compare: 1 2 4 6 8 10; "
                         "none: only the fine-tunes)")
        sub.add_argument("--checkpoints", default="cca_*.pt",
                         help="which fine-tunes in the folder (a glob)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--json", default=f"{study}.json",
                         help="the file it writes in the run folder")
    compare_parser = studies.choices["compare"]
    compare_parser.add_argument("--preset", default="cpu_rgb",
                                help="the run's sampling settings")
    compare_parser.add_argument("--judge", default=None, help="judge name or .pt (default: the "
                                "dataset's shipped judge)")
    compare_parser.add_argument("--sets", type=int, default=1,
                                help="sets of samples per row (sampling seeds seed, seed + 1, "
                                "...): mean ± std")
    seeds_parser = studies.add_parser("seeds", help="one recipe's runs with other seeds: "
                                      "mean ± std of their rows")
    seeds_parser.add_argument("metrics", nargs="+", help="each run's metrics.json")
    plot = studies.add_parser("frontier", help="FID against recall from compare's JSON files")
    plot.add_argument("json_files", nargs="+")
    plot.add_argument("--figure", default="frontier.png")
    args = parser.parse_args(argv)
    if args.study in ("frontier", "seeds"):
        {"frontier": frontier, "seeds": seeds}[args.study](args)
        return
    torch.manual_seed(args.seed)
    if args.per_class is None:
        args.per_class = 100 if args.study == "tilt" else 500
    if args.cfg is None:
        args.cfg = [2.0, 4.0, 10.0] if args.study == "tilt" else [1.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    if args.study == "tilt":
        tilt(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
