"""The one-command demo: poison a CIFAR-10 subset, fit D-VAE, purify through `PurifyStage`, train classifiers,
write a report. `settings` says what runs, `run` runs it, `report` writes what it found."""
from purify_pipeline.demo.report import accuracy_table
from purify_pipeline.demo.run import REPO, find_data, run_demo
from purify_pipeline.demo.settings import (
           SIZES,
           DemoError,
           DemoSettings,
           estimate_seconds,
           resolve_size,
)

__all__ = ["REPO", "SIZES", "DemoError", "DemoSettings", "accuracy_table", "estimate_seconds", "find_data",
           "resolve_size", "run_demo"]
