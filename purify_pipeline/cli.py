"""`purify-pipeline`: the command line. Subcommands wrap the library; errors are one line and exit status 1.

    purify-pipeline convert ~/data/cifar-10-batches-py data/cifar10
    purify-pipeline poison data/cifar10/train-{000000..000009}.tar data/lsp --poison lsp
    purify-pipeline fit data/lsp --out ckpt --preset cpu
    purify-pipeline purify data/lsp out/ --checkpoint ckpt
    purify-pipeline train out/ --test data/cifar10/test-000000.tar
    purify-pipeline demo                      # everything above, end to end, with a report
    purify-pipeline bench                     # list / run the scripts in benchmarks/

Run ``purify-pipeline <command> --help`` for each command's options. ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from . import ray_init
from .ray_init import _first_line, init_ray

__all__ = ["CLIError", "check_checkpoint", "init_ray", "main", "parse_kv"]

PROG = "purify-pipeline"
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------- helpers


def _root_cause(e: BaseException) -> BaseException:
    """The innermost user-facing error of a chain (Ray wraps task errors; `.cause` holds the original)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def _expand(pattern: Sequence[str] | str, what: str = "input") -> list[str]:
    from . import shards

    try:
        return shards.expand(pattern)
    except FileNotFoundError as e:
        raise CLIError(f"no shards match the {what} {' '.join([pattern] if isinstance(pattern, str) else pattern)!r} ({e})") from None


def _output_free(path: str | Path, overwrite: bool, what: str = "output") -> None:
    p = Path(path)
    if p.exists() and (p.is_file() or any(p.iterdir())) and not overwrite:
        raise CLIError(f"{what} {p} already exists (pass --overwrite to replace it)")


def _data_classes(urls: Sequence[str]) -> list[str] | None:
    """Class names from the manifest.json beside the first shard, if any."""
    from . import shards

    man = shards.read_manifest(urls[0].rsplit("/", 1)[0] if "/" in urls[0] else ".") or {}
    names = man.get("classes")
    return [str(c) for c in names] if isinstance(names, list) and names else None


def _first_image(urls: Sequence[str], *, on_error: str = "raise", image_column: str | None = None,
                 want: tuple[int, int] | None = None, limit: int = 1000) -> tuple[tuple[int, int], str, str] | None:  # fmt: skip
    """Size of the first decodable image; with on_error="skip", bad samples, unreadable shards and images of
    another size than `want` are passed over as the job would quarantine them: the first image of size
    `want` if one of the first `limit` samples has it, else the first decodable one (None: none decodes)."""
    from . import shards

    seen, other = 0, None
    for url in urls:
        try:
            for s in shards.iter_samples(url):
                seen += 1
                try:
                    col = image_column or shards.find_image_column(s, shard=url, key=s["__key__"])
                    if col not in s:
                        raise shards.ShardError(f"no .{col} member", shard=url, key=s["__key__"])
                    img = shards.decode_image(s[col], col, shard=url, key=s["__key__"])
                    if on_error != "skip" or want is None or img.shape[:2] == want:
                        return img.shape[:2], url, s["__key__"]
                    other = other or (img.shape[:2], url, s["__key__"])
                except shards.ShardError:
                    if on_error != "skip":
                        raise
                if seen >= limit:
                    return other
        except shards.ShardError:
            if on_error != "skip":
                raise
    if on_error == "skip":
        return other
    raise CLIError(f"the input shards ({urls[0]} ...) hold no samples")


def check_checkpoint(checkpoint: str, urls: Sequence[str], *, resize: str | None = None, on_error: str = "raise",
                     image_column: str | None = None) -> Any:  # fmt: skip
    """Load the checkpoint and check it fits the data: the number of classes (from the data's manifest.json)
    and the image size (from the first sample; with on_error="skip" the first good one, as the job would
    quarantine the bad ones). Returns the Purifier; raises CLIError naming both sides."""
    from .checkpoint import CheckpointError
    from .purifier import Purifier

    try:
        pur = Purifier.load(checkpoint)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    classes = _data_classes(urls)
    if classes is not None and len(classes) != pur.num_classes:
        raise CLIError(f"checkpoint {checkpoint} was fitted for {pur.num_classes} classes but the data has "
                       f"{len(classes)} (manifest.json beside {urls[0]})")  # fmt: skip
    first = _first_image(urls, on_error=on_error, image_column=image_column, want=(pur.image_size, pur.image_size))
    if first is None:
        return pur
    (h, w), url, key = first
    if (h, w) != (pur.image_size, pur.image_size) and resize is None:
        raise CLIError(f"checkpoint {checkpoint} expects {pur.image_size}x{pur.image_size} images but {url} "
                       f"(key {key}) has {h}x{w} (pass --resize bicubic to resize)")  # fmt: skip
    return pur


def parse_kv(items: Sequence[str] | None) -> dict[str, Any]:
    """``key=value`` options; values parsed as JSON when they parse (numbers, true/false), else strings."""
    out: dict[str, Any] = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise CLIError(f"option {it!r} is not key=value")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------ commands


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    _output_free(a.output, a.overwrite)
    man = convert(a.source, a.output, fmt=a.format, splits=a.splits.split(",") if a.splits else None,
                  split=a.split_name, labels=a.labels, classes=a.classes.split(",") if a.classes else None,
                  shard_size=a.shard_size, image_size=a.image_size, limit=a.limit, seed=a.seed,
                  download=a.download, overwrite=a.overwrite)  # fmt: skip
    for name, sp in man["splits"].items():
        print(f"{name}: {sp['samples']} images in {len(sp['shards'])} shards -> {a.output}/{name}-*.tar")
    print(f"{len(man['classes'])} classes; manifest {a.output}/manifest.json")
    return 0


def cmd_poison(a: argparse.Namespace) -> int:
    from .poisons.job import poison_shards

    urls = _expand(a.inputs)
    _output_free(a.output, a.overwrite)
    budget = parse_kv(a.option)
    init_ray(a.address)
    # poison_shards carries the input manifest's class names over: fit and purify read them from manifest.json
    man = poison_shards(urls, a.output, a.poison, seed=a.seed, num_classes=a.num_classes,
                        prefix=a.prefix, num_actors=a.actors, image_column=a.image_column, on_error=a.on_error,
                        **budget)  # fmt: skip
    q = man["counts"]["quarantined"]
    print(f"poisoned {man['counts']['samples']} images with {a.poison} -> {a.output} ({len(urls)} shards"
          + (f"; {q} quarantined in {a.output}/quarantine)" if q else ")"))  # fmt: skip
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from . import DVAEConfig
    from .fit import fit_purifier

    urls = _expand(a.inputs)
    if "://" in a.out and not a.storage_path:
        raise CLIError(f"--out {a.out} is a remote URL: pass --storage-path with a local or shared directory "
                       "for the run state (by default it lives beside --out, which needs a filesystem path)")  # fmt: skip
    if a.storage_path and "://" in a.storage_path:
        raise CLIError(f"--storage-path {a.storage_path} must be a local or shared directory, not a URL")
    _output_free(a.out, a.overwrite, "checkpoint")
    overrides = parse_kv(a.set)
    if a.epochs is not None:
        overrides["epochs"] = a.epochs
    classes = _data_classes(urls)
    if classes is not None:
        overrides.setdefault("num_classes", len(classes))
    try:
        cfg = DVAEConfig.preset(a.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--preset/--set: {e}") from None
    init_ray(a.address)
    fit_purifier(urls, preset=cfg, output=a.out, num_workers=a.workers, use_gpu=a.gpu,
                 cpus_per_worker=a.cpus_per_worker, storage_path=a.storage_path, resume=not a.restart,
                 class_names=classes, bf16=a.bf16)  # fmt: skip
    print(f"checkpoint written to {a.out}")
    return 0


def cmd_purify(a: argparse.Namespace) -> int:
    from .purify import purify_shards

    urls = _expand(a.inputs)
    if not a.resume:
        _output_free(a.output, a.overwrite)
    check_checkpoint(a.checkpoint, urls, resize=a.resize, on_error=a.on_error, image_column=a.image_column)
    init_ray(a.address)
    summary = purify_shards(urls, a.output, a.checkpoint, prefix=a.prefix, mode=a.mode, seed=a.seed,
                            on_error=a.on_error, resize=a.resize, batch_size=a.batch_size, actors=a.actors,
                            num_cpus=a.cpus_per_actor, num_gpus=a.gpus_per_actor, threads=a.threads,
                            overwrite=a.overwrite, progress=True, image_column=a.image_column,
                            audit=a.audit, bf16=a.bf16)  # fmt: skip
    print(summary)  # the result on stdout (with progress shown, purify_shards also logs it on stderr)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from . import shards
    from .classifiers import ClassifierConfig
    from .train_classifier import train_classifier

    train_urls, test_urls = _expand(a.inputs), _expand(a.test, "test")
    if a.out:
        _output_free(a.out, a.overwrite)
    tr = shards.load_arrays(train_urls)
    te = shards.load_arrays(test_urls)
    classes = _data_classes(train_urls)
    k = len(classes) if classes else int(max(tr.labels.max(), te.labels.max())) + 1
    overrides = parse_kv(a.set)
    if a.epochs is not None:
        overrides["epochs"] = a.epochs
    try:
        cfg = ClassifierConfig.preset(a.preset, num_classes=k, **overrides)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--preset/--set: {e}") from None
    device = a.device or ("cuda" if _cuda() else "cpu")
    r = train_classifier(tr.images, tr.labels, te.images, te.labels, cfg, seed=a.seed, device=device)
    r.pop("model")
    print(f"clean test accuracy {100 * r['test_acc']:.2f}% ({len(te.labels)} test images; trained on "
          f"{len(tr.labels)} images, {cfg.epochs} epochs, {r['train_seconds']:.0f} s)")  # fmt: skip
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**r, "train": train_urls, "test": test_urls}, indent=1, default=str) + "\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_bench(a: argparse.Namespace) -> int:
    if not BENCH_DIR.is_dir():
        raise CLIError(f"no benchmarks directory at {BENCH_DIR} (benchmarks ship with the repository, not the wheel)")
    scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.name.startswith("_"))
    if not a.name:
        print(f"benchmarks in {BENCH_DIR} (run: {PROG} bench NAME [ARGS...]; results go to benchmarks/results/):")
        for s in scripts:
            print(f"  {s}")
        return 0
    name = a.name[:-3] if a.name.endswith(".py") else a.name
    if name not in scripts:
        raise CLIError(f"no benchmark {a.name!r}; available: {', '.join(scripts)}")
    args = [sys.executable, str(BENCH_DIR / f"{name}.py"), *a.args]
    print("$ " + " ".join(shlex.quote(x) for x in args), file=sys.stderr)
    return subprocess.call(args, cwd=BENCH_DIR.parent)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoSettings, accuracy_table, resolve_size, run_demo

    overrides: dict[str, Any] = {"train_images": a.images, "test_images": a.test_images, "poison": a.poison,
                                 "preset": a.preset, "seed": a.seed, "mode": a.mode}  # fmt: skip
    if a.no_clean:
        overrides["train_clean"] = False
    gpu = a.gpu or (a.size == "auto" and _cuda())
    settings = DemoSettings.for_size(resolve_size(a.size, gpu=gpu), **overrides)
    command = " ".join([PROG, "demo", *(shlex.quote(x) for x in a._argv)])
    result = run_demo(settings, a.out, data=a.data, address=a.address, gpu=gpu, fit_workers=a.fit_workers,
                      overwrite=a.overwrite, resume=a.resume, command=command)  # fmt: skip
    print()
    print(accuracy_table(result["rows"]))
    print(f"\nreport: {Path(result['output']) / 'report.md'} (+ grid.png, accuracy.png, results.json)")
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    from .audit import audit_shards

    urls = _expand(a.inputs)
    if a.ray:
        init_ray(a.address)
    result = audit_shards(urls, num_classes=a.num_classes, max_images=a.max_images, seed=a.seed, use_ray=a.ray)
    print(json.dumps(result.to_dict()) if a.json else result.summary())
    return 0


# ------------------------------------------------------------------------------------------- parser


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


def build_parser() -> argparse.ArgumentParser:
    from .demo import SIZES

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=fmt)
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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("poison", help="add an unlearnable-example poison to shards",
                       description="Poison shards for experiments: one output shard per input, the image as lossless "
                       "PNG, keys, labels and other members unchanged; manifest.json records the poison.")
    p.add_argument("inputs", nargs="+", help="input shards: brace pattern, glob, directory or paths")
    p.add_argument("output", help="output directory")
    p.add_argument("--poison", default="lsp", help="lsp, ar, ops, em, rem, random, classwise, tap or cuda (default lsp)")
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
    p.set_defaults(func=cmd_poison)

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
    p.add_argument("--storage-path", help="where run state lives (default <out>.runs)")
    p.add_argument("--restart", action="store_true", help="start a fresh run instead of resuming")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    _ray_args(p)
    p.set_defaults(func=cmd_fit)

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
    p.add_argument("--actors", type=int, default=1, help="PurifyStage actor pool size")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs reserved per actor (default: up to 1 each, leaving "
                                                        "the read tasks their CPUs)")  # fmt: skip
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor (0: purify on CPUs)")
    p.add_argument("--threads", type=int, help="torch threads per actor (default: this machine's cores / --actors)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU, or a CPU with AMX / AVX512-BF16: "
                                                       "about 2x faster there; output differs from fp32 by rounding)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in OUTPUT")
    p.add_argument("--audit", action="store_true", help="record the shortcut audit of input and output in "
                   "manifest.json and the summary (about a minute each on 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing OUTPUT")
    _ray_args(p)
    p.set_defaults(func=cmd_purify)

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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="list or run the benchmark scripts in benchmarks/",
                       description="Without NAME: list the benchmarks. With NAME: run benchmarks/NAME.py ARGS.")
    p.add_argument("name", nargs="?", help="benchmark script name (e.g. bench_purify)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=cmd_bench)

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
    p.add_argument("--fit-workers", type=int, help="Ray Train workers for the fit (default: 0 on CPU = the same "
                                                   "loop in this process, 1 with --gpu)")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="use a GPU for fit, purification and classifiers")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier demo output in --out first")
    _ray_args(p)
    p.set_defaults(func=cmd_demo)

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
    p.set_defaults(func=cmd_audit)
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
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------- main


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .convert import ConvertError
    from .demo import DemoError
    from .shards import ShardError

    return (CLIError, ConvertError, DemoError, ShardError, CheckpointError, FileNotFoundError, PermissionError,
            ValueError, ConnectionError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``purify-pipeline`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args._argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    ray_init.DEBUG = bool(args.debug)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        root = _root_cause(e)
        known = isinstance(root, _expected_errors()) or isinstance(e, _expected_errors())
        msg = _first_line(root if isinstance(root, _expected_errors()) else e)
        hint = "" if known else f" ({type(root).__name__}; run with --debug for the traceback)"
        print(f"{PROG}: error: {msg}{hint}", file=sys.stderr)
        return 1
    finally:
        ray_init.shutdown_started_ray()


if __name__ == "__main__":
    sys.exit(main())
