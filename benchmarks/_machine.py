"""Machine facts every benchmark result records."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides bf16 / oneDNN speed here


def _cpu_flags() -> list[str]:
    """The speed-relevant ISA flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return [x for x in _FLAGS if x in flags]


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # e.g. a lent GPU machine with PyTorch only (benchmarks/paper_gpu.py)
        ray_version = "not installed"

    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ray": ray_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512: bf16 speed depends on it
        "cpu_flags": _cpu_flags(),  # AVX512-BF16 / AMX: native bfloat16 (no AMX: bf16 gains less)
        "loadavg_at_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
