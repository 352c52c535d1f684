"""Checkpoints: one directory, `model.safetensors` (both stages) + `config.json`. Nothing is ever unpickled.

Paths may be local or any fsspec URL (s3://, gs://, memory://, ...). Loading checks the weights' sha256 against
the JSON, so a truncated or altered file is an error, not a silently wrong model.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "purify_pipeline.dvae"
VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match what it claims to be."""


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], **storage_options: Any) -> str:
    """Write weights + JSON; return the fingerprint. Files are written under temporary names, then renamed."""
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, **meta, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    meta["fingerprint"] = fingerprint_of(meta)
    fs, root = fsspec.core.url_to_fs(path, **storage_options)
    fs.makedirs(root, exist_ok=True)
    for name, data in ((WEIGHTS, blob), (CONFIG, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())):
        tmp = _join(root, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, _join(root, name))
    return meta["fingerprint"]


def fingerprint_of(meta: dict[str, Any]) -> str:
    """Identity of a checkpoint: its weights and its model config."""
    body = json.dumps({"weights": meta["weights_sha256"], "config": meta.get("config")}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def load_checkpoint(path: str | os.PathLike, **storage_options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint directory; return (tensors, metadata)."""
    path = os.fspath(path)
    fs, root = fsspec.core.url_to_fs(path, **storage_options)
    try:
        with fs.open(_join(root, CONFIG), "rb") as f:
            meta = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a purify_pipeline checkpoint (no {CONFIG})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{CONFIG}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{CONFIG}: format is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported (expected {VERSION})")
    try:
        with fs.open(_join(root, WEIGHTS), "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {WEIGHTS}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(f"{path}/{WEIGHTS}: sha256 {digest[:12]}… does not match config.json "
                              f"({str(meta.get('weights_sha256'))[:12]}…); the file is corrupt or was replaced")  # fmt: skip
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own (version-dependent) error types
        raise CheckpointError(f"{path}/{WEIGHTS}: unreadable safetensors ({e})") from None
    return tensors, meta
