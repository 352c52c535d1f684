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

from purify_pipeline import ray_init
from purify_pipeline.cli_args import PROG, build_parser
from purify_pipeline.ray_init import _first_line, init_ray
from purify_pipeline.stages.preflight import (
    PreflightError,
    check_checkpoint,
    data_classes,
    expand_inputs,
    output_free,
)

__all__ = ["CLIError", "main", "parse_kv"]

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
    from purify_pipeline.data.convert import convert

    output_free(a.output, a.overwrite)
    man = convert(a.source, a.output, fmt=a.format, splits=a.splits.split(",") if a.splits else None,
                  split=a.split_name, labels=a.labels, classes=a.classes.split(",") if a.classes else None,
                  shard_size=a.shard_size, image_size=a.image_size, limit=a.limit, seed=a.seed,
                  download=a.download, overwrite=a.overwrite)  # fmt: skip
    for name, sp in man["splits"].items():
        print(f"{name}: {sp['samples']} images in {len(sp['shards'])} shards -> {a.output}/{name}-*.tar")
    print(f"{len(man['classes'])} classes; manifest {a.output}/manifest.json")
    return 0


def cmd_poison(a: argparse.Namespace) -> int:
    from purify_pipeline.poisons.job import poison_shards

    urls = expand_inputs(a.inputs)
    output_free(a.output, a.overwrite)
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
    from purify_pipeline import DVAEConfig
    from purify_pipeline.stages.fit import fit_purifier

    urls = expand_inputs(a.inputs)
    if "://" in a.out and not a.storage_path:
        raise CLIError(f"--out {a.out} is a remote URL: pass --storage-path with a local or shared directory "
                       "for the run state (by default it lives beside --out, which needs a filesystem path)")  # fmt: skip
    if a.storage_path and "://" in a.storage_path:
        raise CLIError(f"--storage-path {a.storage_path} must be a local or shared directory, not a URL")
    output_free(a.out, a.overwrite, "checkpoint")
    overrides = parse_kv(a.set)
    if a.epochs is not None:
        overrides["epochs"] = a.epochs
    classes = data_classes(urls)
    if classes is not None:
        overrides.setdefault("num_classes", len(classes))
    try:
        cfg = DVAEConfig.preset(a.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--preset/--set: {e}") from None
    init_ray(a.address)
    fit_purifier(urls, preset=cfg, output=a.out, num_workers=a.workers, use_gpu=a.gpu,
                 cpus_per_worker=a.cpus_per_worker, storage_path=a.storage_path, resume=not a.restart,
                 class_names=classes, bf16=a.bf16, compile=a.compile)  # fmt: skip
    print(f"checkpoint written to {a.out}")
    return 0


def cmd_purify(a: argparse.Namespace) -> int:
    from purify_pipeline.stages.purify_shards import purify_shards

    urls = expand_inputs(a.inputs)
    if not a.resume:
        output_free(a.output, a.overwrite)
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
    from purify_pipeline.data import shards
    from purify_pipeline.eval.classifiers import ClassifierConfig
    from purify_pipeline.eval.train_classifier import train_classifier

    train_urls, test_urls = expand_inputs(a.inputs), expand_inputs(a.test, "test")
    if a.out:
        output_free(a.out, a.overwrite)
    tr = shards.load_arrays(train_urls)
    te = shards.load_arrays(test_urls)
    classes = data_classes(train_urls)
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
    from purify_pipeline.demo import (
        DemoSettings,
        accuracy_table,
        resolve_size,
        run_demo,
    )

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
    from purify_pipeline.eval.audit import audit_shards

    urls = expand_inputs(a.inputs)
    if a.ray:
        init_ray(a.address)
    result = audit_shards(urls, num_classes=a.num_classes, max_images=a.max_images, seed=a.seed, use_ray=a.ray)
    print(json.dumps(result.to_dict()) if a.json else result.summary())
    return 0


# --------------------------------------------------------------------------------------------- main


def _expected_errors() -> tuple[type[BaseException], ...]:
    from purify_pipeline.data.convert import ConvertError
    from purify_pipeline.data.shards import ShardError
    from purify_pipeline.demo import DemoError
    from purify_pipeline.dvae.checkpoint import CheckpointError

    return (CLIError, PreflightError, ConvertError, DemoError, ShardError, CheckpointError, FileNotFoundError, PermissionError,
            ValueError, ConnectionError)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``purify-pipeline`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args._argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    ray_init.DEBUG = bool(args.debug)
    try:
        return int(globals()[f"cmd_{args.func}"](args) or 0)
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
