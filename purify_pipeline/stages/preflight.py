"""Checks a job runs before it starts, so a mistake fails in a second with a message naming the file, shard and
key, not minutes later inside a Ray worker: inputs that match no shard, an output that is not free, a checkpoint
fitted for other classes or another image size than the data."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["PreflightError", "check_checkpoint", "data_classes", "expand_inputs", "output_free"]


class PreflightError(ValueError):
    """The data, checkpoint or output does not fit the job; the message says what and where."""


def expand_inputs(pattern: Sequence[str] | str, what: str = "input") -> list[str]:
    from purify_pipeline.data import shards

    try:
        return shards.expand(pattern)
    except FileNotFoundError as e:
        raise PreflightError(f"no shards match the {what} {' '.join([pattern] if isinstance(pattern, str) else pattern)!r} ({e})") from None


def output_free(path: str | Path, overwrite: bool, what: str = "output") -> None:
    p = Path(path)
    if p.exists() and (p.is_file() or any(p.iterdir())) and not overwrite:
        raise PreflightError(f"{what} {p} already exists (pass --overwrite to replace it)")


def data_classes(urls: Sequence[str]) -> list[str] | None:
    """Class names from the manifest.json beside the first shard, if any."""
    from purify_pipeline.data import shards

    man = shards.read_manifest(urls[0].rsplit("/", 1)[0] if "/" in urls[0] else ".") or {}
    names = man.get("classes")
    return [str(c) for c in names] if isinstance(names, list) and names else None


def _first_image(urls: Sequence[str], *, on_error: str = "raise", image_column: str | None = None,
                 want: tuple[int, int] | None = None, limit: int = 1000) -> tuple[tuple[int, int], str, str] | None:  # fmt: skip
    """Size of the first decodable image; with on_error="skip", bad samples, unreadable shards and images of
    another size than `want` are passed over as the job would quarantine them: the first image of size
    `want` if one of the first `limit` samples has it, else the first decodable one (None: none decodes)."""
    from purify_pipeline.data import shards

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
    raise PreflightError(f"the input shards ({urls[0]} ...) hold no samples")


def check_checkpoint(checkpoint: str, urls: Sequence[str], *, resize: str | None = None, on_error: str = "raise",
                     image_column: str | None = None) -> Any:  # fmt: skip
    """Load the checkpoint and check it fits the data: the number of classes (from the data's manifest.json)
    and the image size (from the first sample; with on_error="skip" the first good one, as the job would
    quarantine the bad ones). Returns the Purifier; raises PreflightError naming both sides."""
    from purify_pipeline.dvae.checkpoint import CheckpointError
    from purify_pipeline.dvae.purifier import Purifier

    try:
        pur = Purifier.load(checkpoint)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None
    classes = data_classes(urls)
    if classes is not None and len(classes) != pur.num_classes:
        raise PreflightError(f"checkpoint {checkpoint} was fitted for {pur.num_classes} classes but the data has "
                       f"{len(classes)} (manifest.json beside {urls[0]})")  # fmt: skip
    first = _first_image(urls, on_error=on_error, image_column=image_column, want=(pur.image_size, pur.image_size))
    if first is None:
        return pur
    (h, w), url, key = first
    if (h, w) != (pur.image_size, pur.image_size) and resize is None:
        raise PreflightError(f"checkpoint {checkpoint} expects {pur.image_size}x{pur.image_size} images but {url} "
                       f"(key {key}) has {h}x{w} (pass --resize bicubic to resize)")  # fmt: skip
    return pur
