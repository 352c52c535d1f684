"""Benchmark reports on a fresh clone (benchmarks/cache/ is not committed) keep the committed cells."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_module(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _cell(variant: str, acc: float, fit_s: float) -> dict:
    res = {"final": {"retention": 0.4, "psnr": 24.0, "acc": [acc, acc + 1]}}
    return {"kind": "screen", "poison": "lsp", "variant": variant, "overrides": {}, "images": 10000,
            "precision": "bf16", "fit_seconds": fit_s, "steps_per_stage": [1170, 4680], "final_epoch": {}, "results": res}


def test_ablation_report_on_a_fresh_cache_keeps_committed_cells_and_their_time(tmp_path: Path) -> None:
    out, cache = tmp_path / "results", tmp_path / "cache"
    out.mkdir()
    committed = [_cell("cpu-old", 70.0, 600.0), _cell("cpu-again", 60.0, 300.0)]
    (out / "ablation.json").write_text(json.dumps({"cells": committed, "compute_seconds": 1500.0}))
    # this clone measured one new cell and re-measured `cpu-again` (the new measurement must win)
    # written by the benchmark's own writer, so its file names and the restore's must agree
    ablate = _bench_module("ablate")
    for c in (_cell("cpu-new", 72.0, 120.0), _cell("cpu-again", 65.0, 60.0)):
        ablate._write_cell(cache, c)
    (cache / "runs").mkdir()
    (cache / "runs" / "x__c0.json").write_text(json.dumps({"seconds": 30.0}))
    run = subprocess.run([sys.executable, str(BENCH / "ablate.py"), "--report-only", "--cache", str(cache),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((out / "ablation.json").read_text())
    got = {c["variant"]: c for c in doc["cells"]}
    assert set(got) == {"cpu-old", "cpu-new", "cpu-again"}
    assert got["cpu-old"]["restored_from"] == "ablation.json" and "restored_from" not in got["cpu-new"]
    assert got["cpu-again"]["results"]["final"]["acc"] == [65.0, 66.0]
    # only some committed cells were lost, so their classifier time is unknown: fits + the runs present only
    assert doc["compute_seconds"] == 600.0 + 120.0 + 60.0 + 30.0
    md = (out / "ablation.md").read_text()
    assert "| lsp | cpu-old |" in md and "| lsp | cpu-new |" in md and "65.5 ± 0.5" in md and "60.5" not in md


def test_ablation_fit_cache_hands_the_fit_its_partial_dir_and_times_a_resumed_fit_by_its_epochs(tmp_path: Path) -> None:
    from purify_pipeline import DVAE, DVAEConfig, Purifier

    ablate, cfg, seen = _bench_module("ablate"), DVAEConfig.preset("tiny", num_classes=2), []

    def fit(partial: Path) -> Purifier:
        seen.append(partial)
        return Purifier(DVAE(cfg), DVAE(cfg), metrics={"stage1": [{"seconds": 2e6}], "stage2": [{"seconds": 3e6}]})

    cache = tmp_path / "cache"
    _, fresh = ablate._cached_fit(cache, "a", fit)
    assert seen == [cache / "fits" / "a.partial"] and "fit_resumed" not in fresh and fresh["fit_seconds"] < 1e6  # timed, not summed
    (cache / "fits" / "b.partial").mkdir()  # a stopped fit left its epoch checkpoints
    pur, resumed = ablate._cached_fit(cache, "b", fit)
    assert resumed == {"fit_seconds": 5e6, "fit_resumed": True} and not (cache / "fits" / "b.partial").exists()
    again, again_timing = ablate._cached_fit(cache, "b", fit)  # finished: loaded, not refitted
    assert len(seen) == 2 and again_timing == resumed and again.fingerprint == pur.fingerprint
    assert ablate._cached_fit(cache, "a", fit)[1] == fresh


def test_ablation_infer_control_is_the_products_output_and_each_variant_changes_it() -> None:
    """`ablate.py infer` compares purification-time variants against a control that must be `Purifier.purify`."""
    from purify_pipeline import DVAE, DVAEConfig, Purifier

    ablate, cfg = _bench_module("ablate"), DVAEConfig.preset("tiny", num_classes=3)
    torch.manual_seed(0)
    pur = Purifier(DVAE(cfg), DVAE(cfg))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 20)
    base = ablate._infer_final(pur, images, labels)
    np.testing.assert_array_equal(base, pur.purify(images, labels, mode="sample", seed=0, batch_size=8))
    for name, (changes, _) in ablate.INFER_VARIANTS.items():
        out = ablate._infer_final(pur, images, labels, **changes)
        assert np.array_equal(out, base) == (name == "base"), name
        np.testing.assert_array_equal(out[:7], ablate._infer_final(pur, images[:7], labels[:7], **changes))


def test_matrix_report_only_on_a_fresh_cache_rebuilds_the_committed_table(tmp_path: Path) -> None:
    out, cache = tmp_path / "results", tmp_path / "cache"
    out.mkdir()
    cells = [{"poison": p, "defense": d, "seed": s, "test_acc": acc + s, "train_seconds": 10.0,
              "psnr_vs_clean": None if p == "clean" else 24.0, "retention": None if p == "clean" else 0.3}
             for p, d, acc in (("clean", "none", 76.0), ("lsp", "dvae", 71.0), ("lsp", "jpeg10", 68.0)) for s in (0, 1)]  # fmt: skip
    (out / "matrix.json").write_text(json.dumps({"tier": "cpu-mini", "cells": cells, "step_seconds": {"poisoned-lsp": 5.0}}))
    run = subprocess.run([sys.executable, str(BENCH / "matrix.py"), "--tier", "cpu-mini", "--report-only", "--cache",
                          str(cache), "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((out / "matrix.json").read_text())
    assert len(doc["cells"]) == 6 and doc["total_seconds"] == 6 * 10.0 + 5.0
    assert doc["step_seconds"] == {"poisoned-lsp": 5.0}
    md = (out / "matrix.md").read_text()
    assert "| lsp | — | 71.5 ± 0.5 (1 fit) | 68.5 ± 0.5 |" in md


def test_matrix_partial_run_updates_its_cells_and_keeps_the_others(cifar10_dir: Path, tmp_path: Path) -> None:
    """One poison, two cheap defenses on the smoke tier: the written table still has the committed `ops` row."""
    out, cache = tmp_path / "results", tmp_path / "cache"
    out.mkdir()
    ops = {"poison": "ops", "defense": "jpeg10", "seed": 0, "test_acc": 42.0, "train_seconds": 1.0,
           "psnr_vs_clean": 23.0, "retention": 0.1}  # fmt: skip
    (out / "matrix.json").write_text(json.dumps({"tier": "smoke", "cells": [ops]}))
    run = subprocess.run([sys.executable, str(BENCH / "matrix.py"), "--tier", "smoke", "--data", str(cifar10_dir),
                          "--poisons", "lsp", "--defenses", "none", "jpeg10", "--seeds", "0", "--quiet",
                          "--cache", str(cache), "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = json.loads((out / "matrix.json").read_text())
    got = {(c["poison"], c["defense"]): c for c in doc["cells"]}
    assert set(got) == {("clean", "none"), ("lsp", "none"), ("lsp", "jpeg10"), ("ops", "jpeg10")}
    assert got[("ops", "jpeg10")]["test_acc"] == 42.0 and "restored_from" not in got[("lsp", "jpeg10")]
    assert got[("lsp", "none")]["retention"] == 1.0  # measured here: the undefended set is the poison
    assert len(got[("lsp", "none")]["train_loss"]) == 1  # the per-epoch training loss (the smoke tier: one epoch)
    assert "| ops | — | 42.0 |" in (out / "matrix.md").read_text()
    sha = _bench_module("matrix").poison_digest(np.load(cache / "poisoned-lsp.npz")["images"])
    assert got[("lsp", "none")]["poison_sha256"] == got[("lsp", "jpeg10")]["poison_sha256"] == sha


def test_matrix_report_names_rows_whose_cells_saw_different_poison_generations(tmp_path: Path) -> None:
    out, cache = tmp_path / "results", tmp_path / "cache"
    out.mkdir()
    cells = [{"poison": "em", "defense": d, "seed": 0, "test_acc": 70.0, "train_seconds": 1.0, "psnr_vs_clean": 24.0,
              "retention": 0.1, **({"poison_sha256": g} if g else {})}
             for d, g in (("none", None), ("jpeg10", None), ("dvae", "aaaa"))] + [
             {"poison": "ar", "defense": "none", "seed": 0, "test_acc": 11.0, "train_seconds": 1.0, "psnr_vs_clean": 35.0,
              "retention": 1.0, "poison_sha256": "bbbb"}]  # fmt: skip
    (out / "matrix.json").write_text(json.dumps({"tier": "cpu-mini", "cells": cells}))
    run = subprocess.run([sys.executable, str(BENCH / "matrix.py"), "--tier", "cpu-mini", "--report-only", "--cache",
                          str(cache), "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    md = (out / "matrix.md").read_text()
    assert "- em: aaaa: dvae; unrecorded: jpeg10, none" in md
    assert "- ar:" not in md  # one generation: nothing to flag


def test_matrix_refuses_a_cached_dvae_fit_made_on_another_poison_generation(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from purify_pipeline import DVAEConfig

    m = _bench_module("matrix")
    src = m.dvae_cache_dir(tmp_path, "em", DVAEConfig.preset("cpu"), False) / "poisoned"
    src.mkdir(parents=True)
    (src / "manifest.json").write_text(json.dumps({"poison": "em", "poison_sha256": "0123456789abcdef"}))
    with pytest.raises(RuntimeError, match="poison generation 0123456789abcdef"):
        m._dvae(tmp_path, "em", np.zeros((2, 4, 4, 3), np.uint8), None, "cpu", SimpleNamespace(dvae_bf16=False, dvae_compile=False))


def test_matrix_fits_are_keyed_by_their_resolved_config_and_cells_report_the_spread_over_fits(tmp_path: Path) -> None:
    from purify_pipeline import DVAEConfig

    m = _bench_module("matrix")
    d0 = m.dvae_cache_dir(tmp_path, "lsp", m.dvae_fit_config("cpu", 0), False)
    assert d0 == m.dvae_cache_dir(tmp_path, "lsp", DVAEConfig.preset("cpu"), False)  # same config, same fit
    others = {m.dvae_cache_dir(tmp_path, "lsp", m.dvae_fit_config("cpu", 1), False),  # another fit seed
              m.dvae_cache_dir(tmp_path, "lsp", DVAEConfig.preset("cpu", tau1=1.0), False),  # a changed preset
              m.dvae_cache_dir(tmp_path, "lsp", DVAEConfig.preset("cpu"), True),  # another precision
              m.dvae_cache_dir(tmp_path, "lsp", DVAEConfig.preset("cpu"), False, True)}  # a compiled fit
    assert d0 not in others and len(others) == 4
    assert d0 == m.dvae_cache_dir(tmp_path, "lsp", DVAEConfig.preset("cpu"), False, False)  # older caches keep their key
    (d0 / "checkpoint").mkdir(parents=True)
    (d0 / "checkpoint" / "config.json").write_text("{}")
    assert m.matrix_fit_dir(tmp_path, "lsp", "cpu") == d0  # what ablate.py / diagnose_dvae.py read
    assert m.cell_name({"poison": "lsp", "defense": "dvae", "seed": 1}) == "lsp__dvae__s1"  # committed names hold
    assert m.cell_name({"poison": "lsp", "defense": "dvae", "seed": 1, "dvae_fit_seed": 1}) == "lsp__dvae__s1__fit1"
    cells = [{"poison": "lsp", "defense": "dvae", "seed": s, "dvae_fit_seed": f, "test_acc": acc, "train_seconds": 1.0,
              "psnr_vs_clean": 24.0, "retention": 0.4}
             for f, s, acc in ((0, 0, 71.0), (0, 1, 72.0), (1, 0, 73.0), (1, 1, 74.0))]  # fmt: skip
    m.report(tmp_path, cells, {"command": "x", "cpu_count": 2, "torch": "t", "ray": "r", "device": "cpu"}, "cpu-mini", 4.0)
    s = json.loads((tmp_path / "matrix.json").read_text())["summary"][0]
    assert s["fits"] == [0, 1] and s["mean"] == 72.5 and s["spread"] == 1.5 and s["fit_spread"] == 1.0
    assert "| lsp | 72.5 ± 1.5 (2 fits, fits ± 1.0) |" in (tmp_path / "matrix.md").read_text()


def test_matrix_dvae_then_a_data_defense_is_its_own_cell_on_the_same_fits(cifar10_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvae+jpeg10` reuses each D-VAE fit (no fit of its own), applies JPEG-10 to its output and is scored as its
    own cell, for every fit seed and classifier seed."""
    m = _bench_module("matrix")
    fits, cells = [], []

    def fake_dvae(cache, name, poisoned, clean, preset, args, fit_seed=0):
        fits.append(fit_seed)
        return poisoned  # stands in for the purified images

    monkeypatch.setattr(m, "_dvae", fake_dvae)
    monkeypatch.setattr(m, "run_cell", lambda cache, poison, defense, seed, x, *a, fit=None, **kw:
                        cells.append((defense, seed, fit["dvae_fit_seed"] if fit else None, x)))
    m.main(["--tier", "smoke", "--data", str(cifar10_dir), "--poisons", "lsp", "--defenses", "dvae", "dvae+jpeg10",
            "--seeds", "0", "1", "--dvae-seeds", "0", "1", "--no-clean", "--quiet", "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "o")])
    assert fits == [0, 1, 0, 1]
    assert [(d, s, f) for d, s, f, _ in cells] == [(d, s, f) for d in ("dvae", "dvae+jpeg10") for f in (0, 1) for s in (0, 1)]
    plain, post = cells[0][3], cells[4][3]
    expect = m.apply_defense("jpeg", plain, quality=10)
    assert np.array_equal(post, expect) and not np.array_equal(post, plain)


def test_matrix_clean_row_takes_data_and_training_defenses(cifar10_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--poisons clean` scores the clean training set under other defenses (what a defense costs on clean data):
    no poison is generated, a data defense transforms the clean images, a training defense trains on them as
    they are with its classifier overrides."""
    m = _bench_module("matrix")
    cells = []
    monkeypatch.setattr(m, "_poisoned", lambda *a, **k: pytest.fail("no poison for the clean row"))
    monkeypatch.setattr(m, "run_cell", lambda cache, poison, defense, seed, x, clean, delta, test, clf, args, **kw:
                        cells.append((poison, defense, seed, x, clean, delta, clf, kw.get("poison_sha"))))
    m.main(["--tier", "smoke", "--data", str(cifar10_dir), "--poisons", "clean", "--defenses", "sharpen_ff", "at",
            "--seeds", "0", "--no-clean", "--quiet", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    (p1, d1, _, x1, clean, delta1, clf1, sha1), (p2, d2, _, x2, _, delta2, clf2, _) = cells
    assert (p1, d1, p2, d2) == ("clean", "sharpen_ff", "clean", "at") and delta1 is delta2 is None and sha1 is None
    assert x2 is clean.images and not np.array_equal(x1, clean.images) and x1.shape == clean.images.shape
    assert clf2.adv_eps == m.TRAINING_DEFENSES["at"]["adv_eps"] > 0 and clf1.adv_eps == 0
    assert not (tmp_path / "o" / "grid-clean.png").exists()


def test_defense_cost_benchmark_times_each_training_defense_against_standard_training(cifar10_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """bench_defense_cost.py: one row per defense with its classifier overrides, a ratio to the undefended epoch,
    written as JSON and a table."""
    b = _bench_module("bench_defense_cost")
    doc = b.main(["--data", str(cifar10_dir), "--images", "64", "--repeats", "1", "--defenses", "none", "ueraser",
                  "--out", str(tmp_path)])  # fmt: skip
    rows = {r["defense"]: r for r in doc["rows"]}
    assert set(rows) == {"none", "ueraser"} and rows["none"]["ratio_to_standard"] == 1.0
    assert rows["ueraser"]["overrides"] == {"ueraser": 1} and rows["ueraser"]["ratio_to_standard"] > 0
    assert rows["none"]["s_per_10k_epoch"] == pytest.approx(rows["none"]["median_s"] * 10_000 / 64)
    assert json.loads((tmp_path / "defense-cost.json").read_text())["rows"] == doc["rows"]
    assert "| ueraser | ueraser=1 |" in (tmp_path / "defense-cost.md").read_text()


def test_audit_report_restores_committed_rows_without_replacing_measured_ones(tmp_path: Path) -> None:
    """A fresh clone that audits one more set keeps the committed rows; a set measured again keeps its new row."""
    audit = _bench_module("audit")
    committed = tmp_path / "audit.json"
    committed.write_text(json.dumps({"rows": [{"set": "em+none", "score": 0.97}, {"set": "lsp+dvae-fit0", "score": 0.4}]}))
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "lsp+dvae-fit0.json").write_text(json.dumps({"set": "lsp+dvae-fit0", "score": 0.35}))
    assert audit.restore_rows(rows, committed) == 1
    assert json.loads((rows / "em+none.json").read_text()) == {"set": "em+none", "score": 0.97, "restored_from": "audit.json"}
    assert json.loads((rows / "lsp+dvae-fit0.json").read_text())["score"] == 0.35
    assert audit.restore_rows(rows, committed) == 0 and audit.restore_rows(rows, tmp_path / "missing.json") == 0


def test_machine_facts_name_the_cpu_features_that_decide_bf16_speed() -> None:
    facts = _bench_module("_machine").machine_facts()
    assert set(facts["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    from purify_pipeline.dvae.train import cpu_has_native_bf16

    if Path("/proc/cpuinfo").exists():  # the flags recorded agree with what oneDNN reports
        if {"avx512_bf16", "amx_bf16"} & set(facts["cpu_flags"]):
            assert cpu_has_native_bf16()
        if "avx512f" not in facts["cpu_flags"]:
            assert not cpu_has_native_bf16()


def test_matrix_times_fit_and_purification_apart_and_a_resumed_fit_by_its_epochs() -> None:
    matrix = _bench_module("matrix")
    metrics = {"stage1": [{"seconds": 100.0}, {"seconds": 50.0}], "stage2": [{"seconds": 25.0}]}
    fresh = matrix.dvae_seconds(True, 400.0, 60.0, metrics)
    assert (fresh["fit_s"], fresh["purify_s"], fresh["fit_and_purify_s"]) == (400.0, 60.0, 460.0)
    assert fresh["fit_epochs"] == {"stage1": 2, "stage2": 1}
    # the fit was finished by an earlier run: this run's 0.1 s of "fitting" is not its time
    resumed = matrix.dvae_seconds(False, 0.1, 60.0, metrics)
    assert (resumed["fit_s"], resumed["fit_and_purify_s"]) == (175.0, 235.0)
    assert resumed["fit_timed_by"] != fresh["fit_timed_by"]
