"""Diagnostics of a fitted D-VAE on data whose perturbation is known: what does p̂ capture of δ, and why?

    python benchmarks/diagnose_dvae.py --tier cpu-mini --poison lsp      # uses the matrix's cached fit

Reads the accuracy matrix's cache (clean images, the poisoned set and its exact δ, the `fit_purifier`
checkpoint and its per-epoch metrics.jsonl) and measures, with mean latents (no sampling noise):
- per class, for stage 1 (on the poisoned x) and stage 2 (on the stage-1 output x1): how much of the
  perturbation still in the input p̂ explains (projection <p̂, d>/<d, d>), cos(p̂, d), ||p̂|| / ||d||, and how
  much of p̂ is the same for every image of the class (the class embedding's share) vs image-specific;
- the retention r and PSNR of every intermediate output (x - p̂1, x1 - p̂2, x̂2 = D(x1 - p̂2));
- the class embeddings (norms, pairwise cosine) and the loss terms per epoch of both stages (KL vs τ).
Writes benchmarks/results/diagnostics/<tier>-<poison>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402
from _plots import save_image_grid  # noqa: E402

from purify_pipeline import Purifier, psnr, retention, shards  # noqa: E402
from purify_pipeline.dvae.train import to_float_nchw  # noqa: E402


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.double().flatten(1).numpy()


def explain(p_hat: np.ndarray, d: np.ndarray) -> dict[str, float]:
    """How well p̂ (N, D) matches the perturbation d (N, D) that is actually present: means over images."""
    dd = (d**2).sum(1)
    ok = dd > 0
    proj = (p_hat * d).sum(1)[ok] / dd[ok]
    cos = (p_hat * d).sum(1)[ok] / np.sqrt(dd[ok] * (p_hat**2).sum(1)[ok] + 1e-30)
    ratio = np.sqrt((p_hat**2).sum(1)[ok] / dd[ok])
    return {"projection": float(proj.mean()), "cosine": float(cos.mean()), "norm_ratio": float(ratio.mean())}


def class_share(p_hat: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of p̂'s energy in its class mean (1: one pattern per class; 0: purely image-specific)."""
    total = (p_hat**2).sum()
    means = {c: p_hat[labels == c].mean(0) for c in np.unique(labels)}
    return float(sum((labels == c).sum() * (m**2).sum() for c, m in means.items()) / total)


@torch.no_grad()
def run(pur: Purifier, clean: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, batch: int = 500) -> dict:
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("p1", "x1", "p2", "x2p", "xhat2", "xhat1")}
    for i in range(0, len(poisoned), batch):
        x = to_float_nchw(poisoned[i : i + batch])
        y = torch.from_numpy(labels[i : i + batch]).long()
        o1 = pur.stage1(x, y, sample=False)
        x1 = torch.round(torch.clamp(x - o1.p_hat, 0, 1) * 255) / 255
        p2 = pur.stage2(x1, y, sample=False, decode_x=False).p_hat
        x2p = torch.clamp(x1 - p2, 0, 1)
        xhat2 = pur.stage2(x2p, y, sample=False, decode_p=False).x_hat
        for k, v in zip(outs, (o1.p_hat, x1, p2, x2p, xhat2, o1.x_hat)):
            outs[k].append(v)
    r = {k: torch.cat(v) for k, v in outs.items()}
    to_u8 = lambda t: torch.round(t * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"p1": _flat(r["p1"]), "p2": _flat(r["p2"]), "x1": to_u8(r["x1"]), "x2p": to_u8(r["x2p"]),
            "xhat2": to_u8(r["xhat2"]), "xhat1": to_u8(r["xhat1"])}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="cpu-mini")
    ap.add_argument("--poison", default="lsp")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--train", default="train-{000000..000009}.tar")
    ap.add_argument("--images", type=int, default=2000, help="first N training images (class-balanced shards)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diagnostics"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cache = Path(args.cache or REPO / "benchmarks" / "cache" / args.tier)
    from matrix import matrix_fit_dir  # the matrix cache's layout, from its one owner

    root = matrix_fit_dir(cache, args.poison, args.preset)
    clean_all = shards.load_arrays(str(Path(args.data) / args.train), progress=False)
    n = args.images
    clean, labels = clean_all.images[:n], clean_all.labels[:n]
    poisoned = np.load(cache / f"poisoned-{args.poison}.npz")["images"][:n]
    delta = (poisoned.astype(np.float64) - clean) / 255.0
    pur = Purifier.load(str(root / "checkpoint"))
    r = run(pur, clean, poisoned, labels)
    d = delta.transpose(0, 3, 1, 2).reshape(n, -1)
    d1 = ((r["x1"].astype(np.float64) - clean) / 255.0).transpose(0, 3, 1, 2).reshape(n, -1)  # δ left in x1
    per_class = []
    for c in range(pur.num_classes):
        m = labels == c
        per_class.append({"class": c, "stage1": explain(r["p1"][m], d[m]), "stage2": explain(r["p2"][m], d1[m]),
                          "delta_l2": float(np.sqrt((d[m] ** 2).sum(1)).mean())})  # fmt: skip
    outputs = {"poisoned x": poisoned, "stage-1 recon D(z)": r["xhat1"], "x1 = x - p1": r["x1"],
               "x1 - p2": r["x2p"], "final x2 = D(x1 - p2)": r["xhat2"]}  # fmt: skip
    quality = {k: {"retention": retention(v, clean, delta), "psnr": psnr(v, clean)} for k, v in outputs.items()}
    emb = {}
    for s in ("stage1", "stage2"):
        e = getattr(pur, s).class_embedding.detach().double().flatten(1)
        cos = (e / e.norm(dim=1, keepdim=True)) @ (e / e.norm(dim=1, keepdim=True)).T
        off = cos[~torch.eye(len(e), dtype=torch.bool)]
        emb[s] = {"norm_mean": float(e.norm(dim=1).mean()), "cos_offdiag_mean": float(off.mean()),
                  "cos_offdiag_max": float(off.max())}  # fmt: skip
    metrics_files = sorted((root / "runs").glob("*/metrics.jsonl"))
    history = [json.loads(line) for f in metrics_files for line in f.read_text().splitlines() if line.strip()]
    summary = {
        "tier": args.tier, "poison": args.poison, "preset": args.preset, "images": n,
        "stage1": explain(r["p1"], d), "stage2": explain(r["p2"], d1),
        "p_hat_class_share": {"stage1": class_share(r["p1"], labels), "stage2": class_share(r["p2"], labels),
                              "delta": class_share(d, labels)},
        "quality": quality, "class_embeddings": emb, "per_class": per_class, "history": history,
        "checkpoint": str(root / "checkpoint"), "machine": machine_facts("cpu"),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.tier}-{args.poison}"
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=1))
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [f"# D-VAE diagnostics: {args.poison}, tier {args.tier}, preset {args.preset}", "",
             f"Command: `{summary['machine']['command']}`  ",
             f"First {n} training images, mean latents. projection = <p̂, d>/<d, d> (1: p̂ removes exactly the d "
             "present; 0: nothing of it), d = δ for stage 1 and the δ left in x1 for stage 2.", "",
             "| | projection | cos(p̂, d) | ‖p̂‖/‖d‖ | class share of p̂ energy |", "|---|---|---|---|---|",
             *[f"| {s} | {f3(summary[s]['projection'])} | {f3(summary[s]['cosine'])} | {f3(summary[s]['norm_ratio'])} "
               f"| {f3(summary['p_hat_class_share'][s])} |" for s in ("stage1", "stage2")],
             f"| δ itself | | | | {f3(summary['p_hat_class_share']['delta'])} |", "",
             "| output | retention r | PSNR vs clean (dB) |", "|---|---|---|",
             *[f"| {k} | {f3(v['retention'])} | {v['psnr']:.1f} |" for k, v in quality.items()], "",
             "Per class (stage-1 projection / cosine):  " + ", ".join(
                 f"{c['class']}: {c['stage1']['projection']:.2f}/{c['stage1']['cosine']:.2f}" for c in per_class), "",
             "Class embeddings: " + "; ".join(f"{s} mean norm {v['norm_mean']:.1f}, off-diagonal cosine mean "
                                              f"{v['cos_offdiag_mean']:.3f} (max {v['cos_offdiag_max']:.3f})"
                                              for s, v in emb.items()), ""]  # fmt: skip
    if history:
        lines += ["Loss terms per epoch (from the fit's metrics.jsonl):", "",
                  "| stage | epoch | rec | rec_p | KL | τ | energy |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {h['stage']} | {h['epoch']} | {h['rec']:.5f} | {h['rec_p']:.5f} | {h['kl']:.3f} | {h['tau']} "
                  f"| {h['energy']:.5f} |" for h in history]  # fmt: skip
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    _plot(out / f"{tag}.png", summary, clean, poisoned, r)
    print("\n".join(lines))


def _plot(path: Path, s: dict, clean: np.ndarray, poisoned: np.ndarray, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    cls = [c["class"] for c in s["per_class"]]
    ax[0].bar(np.array(cls) - 0.2, [c["stage1"]["projection"] for c in s["per_class"]], 0.4, label="stage 1")
    ax[0].bar(np.array(cls) + 0.2, [c["stage2"]["projection"] for c in s["per_class"]], 0.4, label="stage 2")
    ax[0].set(title="share of δ explained by p̂ (projection)", xlabel="class", xticks=cls)
    ax[0].legend(fontsize=7)
    for st, ls in ((1, "-"), (2, "--")):
        h = [x for x in s["history"] if x["stage"] == st]
        if h:
            ax[1].plot([x["epoch"] for x in h], [x["kl"] for x in h], ls, label=f"KL stage {st}")
            ax[1].axhline(h[0]["tau"], color="grey", ls=ls, lw=0.8)
            ax[2].plot([x["epoch"] for x in h], [x["rec_p"] for x in h], ls, label=f"rec_p stage {st}")
            ax[2].plot([x["epoch"] for x in h], [x["rec"] for x in h], ls, label=f"rec stage {st}")
    ax[1].set(title="KL per position vs τ (grey)", xlabel="epoch")
    ax[1].legend(fontsize=7)
    ax[2].set(title="reconstruction terms", xlabel="epoch", yscale="log")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    # image strip: δ, p̂1 and p̂2 for the first images, amplified
    n = 6
    amp = lambda v: np.clip(0.5 + 8 * v, 0, 1)  # noqa: E731
    d = (poisoned[:n].astype(np.float64) - clean[:n]) / 255.0
    p1 = r["p1"][:n].reshape(n, 3, *clean.shape[1:3]).transpose(0, 2, 3, 1)
    p2 = r["p2"][:n].reshape(n, 3, *clean.shape[1:3]).transpose(0, 2, 3, 1)
    rows = [("δ (x8)", amp(d)), ("p̂ stage 1 (x8)", amp(p1)), ("p̂ stage 2 (x8)", amp(p2))]
    save_image_grid(path.with_name(path.stem + "-perturbations.png"), rows, row_height=1.4)

if __name__ == "__main__":
    main()
