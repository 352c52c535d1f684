"""The `purify-pipeline` argument parser: every subcommand's options and help, nothing else (`cli` runs them)."""
from __future__ import annotations

import argparse
from typing import Any

PROG = "purify-pipeline"

__all__ = ["PROG", "build_parser"]


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (host:port, 'auto' or ray://host:port); "
                                     "default: start a local Ray")  # fmt: skip


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The parser; each subcommand sets `func` to its name (`cli.main` runs `cmd_<name>`)."""
    from purify_pipeline.demo import SIZES

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=description, formatter_class=fmt)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, **{"formatter_class": fmt, **kw})  # type: ignore[method-assign]

    p = sub.add_parser("convert", help="CIFAR-10/100, an ImageFolder tree or NumPy arrays -> class-balanced shards",
                       description="Convert a dataset to class-balanced WebDataset shards <split>-NNNNNN.tar "
                       "(<key>.png|jpg + <key>.cls) and manifest.json. CIFAR's python-version pickles are read "
                       "with a restricted unpickler that builds only plain data and numeric arrays.")  # fmt: skip
    p.add_argument("source", help="CIFAR directory (cifar-10-batches-py, cifar-100-python, *-bin), ImageFolder "
                                  "root, .npz, or .npy of images (with --labels)")  # fmt: skip
    p.add_argument("output", help="output directory")
    p.add_argument("--format", default="auto", choices=["auto", "cifar", "imagefolder", "npz", "npy"],
                   help="source format (auto: recognised from SOURCE)")
    p.add_argument("--download", choices=["cifar10", "cifar100"], help="fetch with torchvision into SOURCE first (network)")
    p.add_argument("--splits", help="comma-separated splits to convert (default: all found)")
    p.add_argument("--split-name", default="train", help="name of the split of a single-split source (default train)")
    p.add_argument("--labels", help=".npy of labels for a .npy of images")
    p.add_argument("--classes", help="comma-separated class names (default: from the source, else 0..K-1)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, help="resize (shorter side, centre crop) to this square size")
    p.add_argument("--limit", type=int, help="keep only this many samples per split (still class-balanced)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace shards in an existing output directory")
    p.set_defaults(func="convert")

    p = sub.add_parser("poison", help="add an unlearnable-example poison to shards",
                       description="Poison shards for experiments: one output shard per input, the image as lossless "
                       "PNG, keys, labels and other members unchanged; manifest.json records the poison.")
    p.add_argument("inputs", nargs="+", help="input shards: brace pattern, glob, directory or paths")
    p.add_argument("output", help="output directory")
    p.add_argument("--poison", default="lsp", help="lsp, ar, ops, em, rem, random, classwise, tap, sep or cuda (default lsp)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="poison budget/knob, e.g. eps=0.0314")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the inputs' manifest.json)")
    p.add_argument("--prefix", help="output shard prefix (default: the inputs' own, e.g. train)")
    p.add_argument("--actors", type=int, default=2, help="Ray Data actors applying the poison")
    p.add_argument("--image-column", help="image member extension (default: per sample, jpg/jpeg/png/webp/npy)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="skip: quarantine bad samples (kept in OUTPUT/quarantine/, listed in manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUTPUT (same-named shards are replaced)")
    _ray_args(p)
    p.set_defaults(func="poison")

    p = sub.add_parser("fit", help="fit the two-stage D-VAE on (poisoned) shards with Ray Train",
                       description="Fit D-VAE on training shards and write a checkpoint (safetensors + JSON). "
                       "An interrupted fit resumes from its last epoch when re-run with the same arguments.")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="training shards")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", default="cpu", help="paper | cpu | cpu-v2 | cpu-v1 | small | tiny (default cpu)")
    p.add_argument("--epochs", type=int, help="epochs per stage (overrides the preset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="other DVAEConfig field, e.g. width=16")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: run the loop in this process)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default 0.5 on CPU, 1 with --gpu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU, or a CPU with AMX / AVX512-BF16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model while fitting (a CPU needs a C++ compiler; with --bf16 on AMX: 1.06-1.12x)")
    p.add_argument("--storage-path", help="where run state lives (default <out>.runs)")
    p.add_argument("--restart", action="store_true", help="start a fresh run instead of resuming")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    _ray_args(p)
    p.set_defaults(func="fit")

    p = sub.add_parser("purify", help="purify shards with a checkpoint through PurifyStage (Ray Data)",
                       description="Purify WebDataset shards: <output>/<prefix>-NNNNNN.tar + manifest.json. "
                       "Labels are required (the D-VAE class embedding uses them).")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="input shards: brace pattern, glob, directory or paths/URLs")
    p.add_argument("output", help="output directory or URL")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or URL written by fit")
    p.add_argument("--mode", default="sample", choices=["sample", "mean"], help="sampled z (paper) or z = mu")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--prefix", default="purified", help="output shard name prefix (default purified)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="skip: quarantine bad samples (kept in OUTPUT/quarantine/, listed in manifest.json)")
    p.add_argument("--image-column", help="image member extension (default: per sample, jpg/jpeg/png/webp/npy)")
    p.add_argument("--resize", help="resize images to the checkpoint's size with this PIL filter (e.g. bicubic)")
    p.add_argument("--batch-size", type=int, default=256, help="images per Ray batch and per forward pass")
    p.add_argument("--actors", type=int, help="PurifyStage actor pool size (default: one per GPU with "
                                              "--gpus-per-actor, else one single-threaded actor per CPU)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs reserved per actor (default: up to 1 each, leaving "
                                                        "the read tasks their CPUs)")  # fmt: skip
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (0: purify on CPUs)")
    p.add_argument("--threads", type=int, help="torch threads per actor (default: 1 with the default pool, "
                                               "else this machine's cores / --actors)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU, or a CPU with AMX / AVX512-BF16: "
                                                       "1.4-1.7x faster there; output differs from fp32 by rounding)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in OUTPUT")
    p.add_argument("--audit", action="store_true", help="record the shortcut audit of input and output in "
                   "manifest.json and the summary (about a minute each on 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing OUTPUT")
    _ray_args(p)
    p.set_defaults(func="purify")

    p = sub.add_parser("train", help="train an evaluation classifier on shards, test on clean shards",
                       description="Train a classifier (in this process) and print its clean test accuracy.")
    p.add_argument("inputs", nargs="+", help="training shards")
    p.add_argument("--test", required=True, help="test shards (pattern or directory)")
    p.add_argument("--preset", default="fast", help="fast | paper | tiny (default fast)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="other ClassifierConfig field")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func="train")

    p = sub.add_parser("bench", help="list or run the benchmark scripts in benchmarks/",
                       description="Without NAME: list the benchmarks. With NAME: run benchmarks/NAME.py ARGS.")
    p.add_argument("name", nargs="?", help="benchmark script name (e.g. bench_purify)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func="bench")

    p = sub.add_parser("demo", help="poison CIFAR-10 with LSP, fit D-VAE, purify, train classifiers, write a report",
                       formatter_class=fmt, description=_demo_help(SIZES))
    p.add_argument("--data", help="CIFAR-10 shard directory (default: $PURIFY_PIPELINE_DATA, then "
                                  "../shared/data/cifar10 beside the repository, else download)")  # fmt: skip
    p.add_argument("--out", default="purify-demo", help="output directory (default ./purify-demo)")
    p.add_argument("--size", default="auto", choices=["auto", *SIZES],
                   help="problem size: auto = paper on a CUDA GPU, else cpu-mini")  # fmt: skip
    p.add_argument("--images", type=int, help="training images (overrides --size)")
    p.add_argument("--test-images", type=int, help="test images (overrides --size)")
    p.add_argument("--poison", help="poison (default lsp)")
    p.add_argument("--preset", help="D-VAE preset (overrides --size)")
    p.add_argument("--mode", choices=["sample", "mean"], help="purification mode (default sample)")
    p.add_argument("--seed", type=int, help="seed of the poison, the fit and the classifiers (default 0)")
    p.add_argument("--no-clean", action="store_true", help="skip the clean reference classifier")
    p.add_argument("--fit-workers", type=int, help="Ray Train workers for the fit (default 1; 0 runs the same loop "
                                                   "in this process)")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="use a GPU for fit, purification and classifiers")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier demo output in --out first")
    _ray_args(p)
    p.set_defaults(func="demo")

    p = sub.add_parser("audit", help="learnability audit: are labelled shards shortcut-poisoned? (no clean test set)",
                       description="Train two small linear probes (raw pixels; high-frequency residual structure) "
                       "on half of a seeded sample of the shards and score them on the other half. Availability "
                       "poisons are shortcuts a linear model fits; clean images are not linearly separable. Prints "
                       "the shortcut score and a verdict: clean-like / suspicious / poisoned (thresholds calibrated "
                       "on clean CIFAR-10; see benchmarks/results/audit/).")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="shards with <key>.cls labels: brace pattern, glob, directory or paths")
    p.add_argument("--num-classes", type=int, help="number of classes (default: largest label + 1)")
    p.add_argument("--max-images", type=int, default=10_000, help="images sampled (seeded, by key hash)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--ray", action="store_true", help="sample and decode with Ray Data (one task per shard)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _ray_args(p)
    p.set_defaults(func="audit")
    return parser


def _demo_help(sizes: dict[str, Any]) -> str:
    rows = "\n".join(f"  {n:8s} {s.train_images:6d} train / {s.test_images:5d} test images, D-VAE preset "
                     f"{s.preset}, classifier {s.classifier}" for n, s in sizes.items())  # fmt: skip
    return ("Run the whole job on CIFAR-10: poison a class-balanced subset (LSP), fit D-VAE on it, purify it through\n"
            "PurifyStage, train a classifier on clean, poisoned, JPEG-10 and purified images, print the accuracy table\n"
            "and write report.md + grid.png + accuracy.png + results.json to --out.\n\nSizes:\n" + rows +
            "\n\n'auto' (the default) is 'paper' on a CUDA GPU, else 'cpu-mini' (an hour or more on 2 CPU cores); the\n"
            "demo prints a time estimate for this machine before it starts. 'tiny' checks the pipeline in minutes;\n"
            "its accuracies mean nothing.")  # fmt: skip


def _version() -> str:
    from purify_pipeline import __version__

    return __version__
