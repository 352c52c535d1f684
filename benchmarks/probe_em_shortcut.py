"""Probe: how strong a shortcut is EM with given compute knobs? (the setup of tests/test_poisons.py)

    python benchmarks/probe_em_shortcut.py

Fits EM on the 2,000-image subset (train-000000..000001) with two knob sets and prints the shortcut probe's
training accuracy after each of 6 epochs (tests/test_poisons.py's ShortcutProbe, Adam 1e-3, batch 50).
"""
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import test_poisons as tp  # noqa: E402

from purify_pipeline import poisons, shards  # noqa: E402

arr = shards.load_arrays([str(REPO.parent / "shared/data/cifar10" / f"train-{i:06d}.tar") for i in range(2)],
                         progress=False)  # fmt: skip
for kw in [dict(width=8, pgd_steps=5, step_size=3.2 / 255, stop_error=0.01, max_rounds=20),
           dict(width=16, pgd_steps=10, stop_error=0.01, max_rounds=20)]:  # fmt: skip
    t = time.time()
    p = poisons.fit("em", arr.images, arr.labels, num_classes=10, seed=0, sample_ids=arr.keys, progress=False, **kw)
    curve = tp.train_accuracy_curve(p.apply(arr.images, arr.labels, sample_ids=arr.keys), arr.labels, tp.EPOCHS)
    print(kw, round(time.time() - t), p.converged, len(p.history), [round(c, 3) for c in curve], flush=True)
