"""Progress bars that tests and batch jobs can silence (PURIFY_PIPELINE_NO_PROGRESS=1)."""
from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("PURIFY_PIPELINE_NO_PROGRESS", "") in ("", "0")


def progress(iterable: Any = None, *, enabled: bool = True, **kw: Any) -> tqdm:
    """tqdm on stderr, disabled when asked to or when PURIFY_PIPELINE_NO_PROGRESS is set."""
    return tqdm(iterable, disable=not progress_enabled(enabled), file=sys.stderr, dynamic_ncols=True, **kw)
