"""Machine facts every benchmark result records."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any


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
        "loadavg_at_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
