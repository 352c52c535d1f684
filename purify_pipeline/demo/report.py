"""The demo's report: report.md (what ran, the accuracy table, a verdict), grid.png and accuracy.png."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from purify_pipeline.demo.settings import MEANINGFUL, DemoSettings

__all__ = ["accuracy_table"]


def _grid(path: Path, classes: Sequence[str], rows: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
    """One example per class (columns); rows: clean, poisoned, amplified perturbation, purified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [int(np.flatnonzero(labels == c)[0]) for c in range(len(classes)) if (labels == c).any()][:10]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.45 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c, i in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(imgs[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(classes[labels[i]], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(path: Path, rows: list[dict[str, Any]], chance: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = [r["train_set"] for r in rows]
    accs = [100 * r["test_acc"] for r in rows]
    colors = {"clean": "#4c72b0", "poisoned": "#c44e52", "purified": "#55a868", "JPEG-10": "#dd8452"}
    bars = ax.bar(names, accs, color=[colors.get(n.split()[0], "#8172b2") for n in names])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a + 1, f"{a:.1f}", ha="center", fontsize=9)
    ax.axhline(100 * chance, color="gray", ls="--", lw=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the classifier runs."""
    lines = ["| training set | images | clean test accuracy | train accuracy (last epoch) | train seconds |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['train_set']} | {r['train_images']} | {100 * r['test_acc']:.1f}% | "
                     f"{100 * r['train_acc']:.1f}% | {r['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def _verdict(s: DemoSettings, rows: list[dict[str, Any]]) -> str:
    """The report's closing sentence: what the numbers say, or that they say nothing at this size."""
    if s.size not in MEANINGFUL:
        return (f"Size `{s.size}` checks that the pipeline runs end to end: its models are far too small and short "
                "for the accuracies above to mean anything about the method. Run the default size for that.")
    acc = {r["train_set"].split()[0].lower(): 100 * r["test_acc"] for r in rows}
    gain = acc["purified"] - acc["poisoned"]
    text = (f"D-VAE purification moved clean test accuracy from {acc['poisoned']:.1f}% (trained on the poisoned images) "
            f"to {acc['purified']:.1f}% ({gain:+.1f} points); JPEG-10 reached {acc['jpeg-10']:.1f}%")
    if "clean" in acc:
        text += f", and the clean images {acc['clean']:.1f}%"
    return text + ". One D-VAE fit and one classifier seed: benchmarks/results/cpu-mini has the spread over seeds."


def _report(out: Path, s: DemoSettings, info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    t = info["seconds"]
    md = [
        "# purify-pipeline demo report",
        "",
        f"An unlearnable-example poison (**{s.poison.upper()}**) was added to {s.train_images} CIFAR-10 training images "
        f"({s.train_images // info['num_classes']} per class). A classifier trained on them learns the poison's shortcut "
        "instead of the images. D-VAE (Yu et al., ICML 2024) was fitted on the poisoned images alone and used to purify "
        "them; the same classifier recipe was then trained on each version and tested on clean test images.",
        "",
        "![examples](grid.png)",
        "",
        "Rows: clean image, poisoned image, the perturbation (poisoned − clean, amplified ×8 around grey), purified image.",
        "",
        "## Accuracy",
        "",
        accuracy_table(rows),
        "",
        "![accuracy](accuracy.png)",
        "",
        f"Chance is {100 / info['num_classes']:.0f}%. Test set: {info['test_images']} clean CIFAR-10 test images. "
        f"Classifier: `{s.classifier}` preset {dict(s.classifier_overrides) or ''}, seed {s.seed}.",
        "",
        "## Purification",
        "",
        f"- PSNR to the clean images: poisoned {info['psnr_poisoned']:.2f} dB, purified {info['psnr_purified']:.2f} dB.",
        f"- Shortcut audit (labels only, no clean data; `purify-pipeline audit`): poisoned "
        f"{info['audit']['poisoned']['score']:.2f} ({info['audit']['poisoned']['verdict']}), purified "
        f"{info['audit']['purified']['score']:.2f} ({info['audit']['purified']['verdict']}); clean-like up to "
        f"{info['audit']['purified']['thresholds'][0]:.2f} (benchmarks/results/audit).",
        f"- Perturbation retained in the purified images (projection onto the poison, 1 = untouched, 0 = removed): "
        f"{info['retention']:.3f}.",
        f"- D-VAE: preset `{s.preset}` {dict(s.preset_overrides) or ''} (width {info['dvae']['width']}, "
        f"{info['dvae']['epochs']} epochs per stage{', bf16 autocast' if info['dvae'].get('bf16') else ', fp32'}), "
        f"checkpoint `checkpoint/` ({info['fingerprint'][:12]}).",
        f"- Purification through `PurifyStage` (`purify_shards`, mode `{s.mode}`): {info['purify']['images_per_s']:.0f} "
        "images/s.",
        "",
        "## Time",
        "",
        "| step | seconds | estimated before the run |",
        "|---|---|---|",
        *[f"| {k} | {v:.0f} | {info['estimate'][k]:.0f} |" if k in info.get("estimate", {}) else f"| {k} | {v:.0f} | |"
          for k, v in t.items()],
        "",
        f"Machine: {info['machine']}.",
        "",
        _verdict(s, rows),
        "",
        f"Reproduce: `{info['command']}`.",
        "",
    ]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


def _machine() -> str:
    import platform

    import ray
    import torch

    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}, {torch.backends.cpu.get_cpu_capability()}), {dev}, "
            f"torch {torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}")  # fmt: skip
