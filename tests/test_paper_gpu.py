"""benchmarks/paper_gpu.py, the GPU paper-tier script, kept from rotting between GPU runs: its smoke mode
runs every code path on the CPU (tiny widths, 1k images, one epoch), then --report builds the results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_gpu.py"


def test_paper_gpu_smoke_and_report(cifar10_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--data", str(cifar10_dir),
                          "--out", str(out), "--jobs", "dvae", "none"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + (out / "jobs.log").read_text()[-2000:]
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds[:4] == ["facts", "data", "probe", "plan"] and kinds[-1] == "done"
    assert recs[-1]["exit_codes"] == {"dvae": 0, "none": 0}
    cells = {r["defense"]: r for r in recs if r["kind"] == "cell"}
    assert set(cells) == {"dvae", "none"}
    assert cells["none"]["retention"] == 1.0  # the poisoned set is the poison, exactly
    assert cells["dvae"]["retention"] < 1.0 and cells["dvae"]["train_images"] == 1024
    # a job never runs more torch threads than the machine has cores (oversubscribed, oneDNN's AVX-512 kernels
    # corrupted the heap on a 2-core machine; 3 threads was the 16-core GPU host's share)
    assert all(1 <= c["torch_threads"] <= min(3, len(os.sched_getaffinity(0))) for c in cells.values())
    assert all(v > 0 for k, v in next(r for r in recs if r["kind"] == "probe").items() if k.endswith("_img_s"))
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"model.safetensors", "config.json"}
    z = np.load(out / "samples.npz")
    assert z["dvae"].shape == z["clean"].shape and z["dvae"].dtype == np.uint8

    # a standalone job (what a second call on a warm GPU machine runs) records its own machine facts
    out2 = tmp_path / "run2"
    job = subprocess.run([sys.executable, str(SCRIPT), "--job", "none", "--seed", "1", "--smoke", "--device", "cpu",
                          "--data", str(cifar10_dir), "--out", str(out2), "--work", str(out) + "-work"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    recs2 = [json.loads(line) for line in (out2 / "results.jsonl").read_text().splitlines()]
    assert recs2[0]["kind"] == "facts" and "--job" in recs2[0]["command"]
    assert [r["seed"] for r in recs2 if r["kind"] == "cell"] == [1]

    rep = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "results.jsonl"),
                          str(out2 / "results.jsonl"), "--samples", str(out / "samples.npz"),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "report" / "matrix.md").read_text()
    assert "| lsp | " in md and "dvae-ep1" in md  # the 1-epoch smoke fit never poses as the paper's 60
    summary = json.loads((tmp_path / "report" / "matrix.json").read_text())["summary"]
    assert next(s for s in summary if s["poison"] == "lsp" and s["defense"] == "none")["seeds"] == [0, 1]
    assert {"matrix.json", "accuracy.png", "grid-lsp.png"} <= {p.name for p in (tmp_path / "report").iterdir()}


def test_paper_gpu_poison_overrides_are_applied_and_recorded(cifar10_dir: Path, tmp_path: Path) -> None:
    """--poison-set (e.g. a small EM surrogate and a round cap, to fit a short GPU run) reaches the poison and the
    record, so a changed poison never poses as the paper's."""
    out = tmp_path / "em"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--data", str(cifar10_dir),
                          "--out", str(out), "--jobs", "none", "--poison", "em", "--poison-set", "surrogate=small",
                          "--poison-set", "max_rounds=1"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    data = next(r for r in recs if r["kind"] == "data")
    assert data["poison"] == "em" and data["poison_overrides"] == {"surrogate": "small", "max_rounds": 1}
    assert data["poison_config"]["surrogate"] == "small" and data["poison_config"]["max_rounds"] == 1
    cell = next(r for r in recs if r["kind"] == "cell")
    assert cell["poison"] == "em" and cell["retention"] == 1.0
    rep = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "results.jsonl"), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "poison settings changed from the paper's" in (tmp_path / "report" / "matrix.md").read_text()


def test_campaign_runs_the_first_missing_step_and_the_next_call_continues(cifar10_dir: Path, tmp_path: Path) -> None:
    """benchmarks/campaign.py: from the committed cells it picks the first missing step (AR's D-VAE and undefended
    rows here), runs it through paper_gpu.py (smoke widths on the CPU), and a second call, reading that step's
    results.jsonl, plans the next step (AR's second seed) instead of repeating it. `--compile` passes through."""
    script = SCRIPT.parent / "campaign.py"
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "run1.jsonl").write_text(json.dumps({"kind": "cell", "poison": "em", "defense": "dvae", "seed": 0,
                                                      "dvae_epochs": 15}) + "\n" + json.dumps(
        {"kind": "cell", "poison": "em", "defense": "none", "seed": 0}) + "\n")  # fmt: skip
    common = ["--committed", str(committed), "--out", str(tmp_path / "out"), "--poisons", "em", "ar",
              "--data", str(cifar10_dir)]  # fmt: skip
    run = subprocess.run([sys.executable, str(script), *common, "--smoke", "--device", "cpu", "--max-steps", "1",
                          "--min-step-s", "0", "--compile"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    first = json.loads(run.stdout.splitlines()[0])["next"]
    assert first == {"name": "ar-s0", "poison": "ar", "jobs": ["dvae", "none"], "seed": 0, "dvae_epochs": None}
    recs = [json.loads(x) for x in (tmp_path / "out" / "ar-s0" / "results.jsonl").read_text().splitlines()]
    assert {(r["poison"], r["defense"], r["seed"]) for r in recs if r["kind"] == "cell"} == {("ar", "dvae", 0),
                                                                                               ("ar", "none", 0)}
    # --compile reaches the step: the probe times the compiled fit variants too, and the D-VAE cell was fitted in the
    # probe's fastest variant, which it names
    probe = next(r for r in recs if r["kind"] == "probe")
    prec = probe["jobs_precision"]
    assert all(probe[f"dvae_train_{prec}_{v}_img_s"] > 0 for v in ("nhwc_compiled", "nhwc_cudagraphs", "host_nchw"))
    cell = next(r for r in recs if r["kind"] == "cell" and r["defense"] == "dvae")
    assert cell["dvae_fit_variant"] == probe["fit_variant"] != "host_nchw"
    assert probe["dvae_train_img_s"] == max(v for k, v in probe.items() if k.startswith(f"dvae_train_{prec}_")
                                            and k.endswith("_img_s") and "host" not in k)  # fmt: skip
    plan = subprocess.run([sys.executable, str(script), *common, "--plan"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    nxt = json.loads(plan.stdout.splitlines()[0])["next"]
    assert nxt["name"] == "em-s1" and nxt["seed"] == 1 and nxt["jobs"] == ["dvae"]  # committed EM, then AR's


def test_campaign_priority_reaches_the_rest_of_the_threat_model() -> None:
    """After D-VAE on the first four poisons, their second seeds and the full LSP fit, the campaign adds CUDA, SEP
    and REM (D-VAE and undefended); every poison setting it passes is a real option of that poison."""
    import dataclasses

    sys.path.insert(0, str(SCRIPT.parent))
    import campaign

    from purify_pipeline import poisons

    done = {(p, d, s, 15) for p in ["lsp", *campaign.POISONS] for d in ("dvae", "none") for s in (0, 1)}
    assert campaign.next_step(done, campaign.POISONS)["name"] == "lsp-full"
    done.add(("lsp", "dvae", 0, 60))
    steps = []
    while not (step := campaign.next_step(done, campaign.POISONS))["name"].endswith("-defenses"):
        steps.append((step["name"], step["jobs"]))
        done |= {(step["poison"], j, step["seed"], 15) for j in step["jobs"]}
    assert steps == [(f"{p}-s0", ["dvae", "none"]) for p in ("cuda", "sep", "rem")]
    for table in (campaign.POISON_SET, campaign.SMOKE_SET):
        for name, kvs in table.items():
            fields = {f.name for f in dataclasses.fields(poisons.get(name).config_cls)}
            assert {kv.split("=")[0] for kv in kvs} <= fields, (name, kvs)


def test_campaign_then_adds_the_other_defenses_columns_then_at_then_ueraser_max() -> None:
    """After every poison's D-VAE and undefended rows, the campaign adds sharpen+filter and UEraser on each poison,
    then PGD adversarial training with the shortened classifier schedule it records, then UEraser-Max; then nothing
    is left."""
    sys.path.insert(0, str(SCRIPT.parent))
    import campaign

    rows = ["lsp", *campaign.POISONS, *campaign.LATER_POISONS]
    done = {(p, d, s, 15) for p in rows for d in ("dvae", "none") for s in (0, 1)} | {("lsp", "dvae", 0, 60)}
    steps = []
    while (step := campaign.next_step(done, campaign.POISONS)) is not None:
        steps.append((step["name"], step["jobs"], step.get("clf_epochs")))
        done |= {(step["poison"], j, step["seed"], None) for j in step["jobs"]}
    assert steps == ([(f"{p}-defenses", ["sharpen_ff", "ueraser"], None) for p in rows]
                     + [(f"{p}-at", ["at"], campaign.AT_CLF_EPOCHS) for p in rows]
                     + [(f"{p}-ueraser-max", ["ueraser-max"], None) for p in rows])


def test_paper_gpu_training_defense_job_trains_on_the_poison_with_its_overrides(cifar10_dir: Path,
                                                                               tmp_path: Path) -> None:
    """A training-time defense job (UEraser here; `at` takes the same path) trains on the poisoned images as they
    are with the matrix's classifier overrides, and its cell says so; a shortened schedule gets its own column."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--data", str(cifar10_dir),
                          "--out", str(out), "--jobs", "ueraser", "sharpen_ff"], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + (out / "jobs.log").read_text()[-2000:]
    cells = {r["defense"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
             if r["kind"] == "cell"}  # fmt: skip
    assert set(cells) == {"ueraser", "sharpen_ff"}
    assert cells["ueraser"]["classifier_overrides"] == {"ueraser": 1} and cells["ueraser"]["retention"] == 1.0
    assert "classifier_overrides" not in cells["sharpen_ff"] and cells["sharpen_ff"]["retention"] < 1.0
    rep = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "results.jsonl"), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "ueraser-clf1" in (tmp_path / "report" / "matrix.md").read_text()  # the 1-epoch smoke schedule, labelled
