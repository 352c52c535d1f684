"""Soak test of `purify_shards` under faults: many CIFAR-10 images, 1% bad samples, one killed actor, one
killed driver + resume; the good samples' output must equal a fault-free run's, byte for byte.

    python benchmarks/soak.py --images 50000            # writes benchmarks/results/soak/soak-<images>.{json,md}

Steps (each job runs in its own process with its own local Ray, like a user's CLI run):
1. Build inputs from /work/shared/data/cifar10 train shards (1,000 samples each): a *faulty* copy where a
   seeded 1% of the samples are broken (undecodable image, label out of range, non-integer label, wrong
   size, a stray member without an extension) and a *clean* copy holding exactly the good samples.
2. Fault-free run on the clean copy.
3. Faulty run, on_error="skip": the driver process is SIGKILLed once a third of the shards are written, then
   the job is re-run with resume; in the resumed run one PurifyBatch actor process is SIGKILLed after the
   first shard it writes (Ray restarts it and retries its batch).
4. Checks: every output shard's sha256 equals the fault-free run's (so the good samples' bytes are equal);
   manifest counts in = out + quarantined per shard; quarantined = injected faults exactly; the quarantine
   shards hold the injected samples' original bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from purify_pipeline import shards  # noqa: E402

KINDS = ("undecodable", "label out of range", "label not an integer", "wrong size", "member without extension")


def build_inputs(data: Path, n_shards: int, per_shard: int, work: Path, rate: float, seed: int) -> dict:
    """Faulty and clean shard copies; returns the injected faults {shard index: [(key, kind), ...]}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (work / "faulty").mkdir(parents=True, exist_ok=True)
    (work / "clean").mkdir(parents=True, exist_ok=True)
    injected: dict[int, list[tuple[str, str]]] = {}
    for i in range(n_shards):
        samples = [s for _, s in zip(range(per_shard), shards.iter_samples(str(data / f"train-{i:06d}.tar")))]
        faulty, clean = [], []
        for s in samples:
            key = s["__key__"]
            members = [(f"{key}.jpg", s["jpg"]), (f"{key}.cls", s["cls"])]
            if rng.random() >= rate:
                faulty.append(members)
                clean.append(members)
                continue
            kind = KINDS[int(rng.integers(len(KINDS)))]
            if kind == "undecodable":
                members[0] = (f"{key}.jpg", s["jpg"][: len(s["jpg"]) // 3])
            elif kind == "label out of range":
                members[1] = (f"{key}.cls", b"10")
            elif kind == "label not an integer":
                members[1] = (f"{key}.cls", b"cat")
            elif kind == "wrong size":
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), (9, 9, 9)).save(buf, format="PNG")
                members[0] = (f"{key}.jpg", buf.getvalue())
            else:  # a stray member: a group of its own; the sample itself stays good
                stray = f"stray{len(injected.get(i, []))}_{key}"
                faulty.append([(stray, b"stray bytes")])
                injected.setdefault(i, []).append((stray, kind))
                faulty.append(members)
                clean.append(members)
                continue
            faulty.append(members)
            injected.setdefault(i, []).append((key, kind))
        shards.write_members(str(work / "faulty" / f"train-{i:06d}.tar"), faulty)
        shards.write_members(str(work / "clean" / f"train-{i:06d}.tar"), clean)
    return injected


def _job(args: list[str], *, kill_after_shards: int | None = None, out: Path | None = None, retries: int = 2) -> dict:
    """Run one `--child` job in its own process group; optionally SIGKILL the whole group once `out`'s
    manifest lists kill_after_shards shards. A run that fails on its own (e.g. a raylet declared dead on an
    overloaded machine) is resumed up to `retries` times. Returns {"seconds", "killed", "rc", "attempts"}."""
    t0 = time.perf_counter()
    for attempt in range(1, retries + 2):
        r = _job_once(args, kill_after_shards=kill_after_shards, out=out)
        if r["killed"] or r["rc"] == 0:
            break
    return {**r, "seconds": time.perf_counter() - t0, "attempts": attempt}


def _job_once(args: list[str], *, kill_after_shards: int | None = None, out: Path | None = None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", *args], start_new_session=True)
    killed = False
    while p.poll() is None:
        time.sleep(0.5)
        if kill_after_shards is not None and out is not None:
            m = shards.read_manifest(str(out)) if (out / "manifest.json").exists() else None
            if m and len(m.get("shards", [])) >= kill_after_shards:
                os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started
                p.wait()
                killed = True
    return {"seconds": time.perf_counter() - t0, "killed": killed, "rc": p.returncode}


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_one_actor() -> int | None:
    """SIGKILL one PurifyBatch actor process of this driver's local Ray (found among its own descendants)."""
    for pid in _descendants(os.getpid()):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if "PurifyBatch" in title:
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def child(a: argparse.Namespace) -> None:
    import ray

    from purify_pipeline.stages.purify_shards import purify_shards

    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 * 1024)  # fmt: skip
    state = {"killed_actor": None}

    def on_written(entry: dict) -> None:
        if a.kill_actor and state["killed_actor"] is None:
            state["killed_actor"] = _kill_one_actor()

    s = purify_shards(a.inputs, a.output, a.checkpoint, on_error="skip", actors=a.actors, num_cpus=0.75, threads=1,
                      batch_size=250, progress=False, on_shard_written=on_written)  # fmt: skip
    Path(a.output, "run-summary.json").write_text(json.dumps({**vars(s), "killed_actor_pid": state["killed_actor"]}))


def check(out: Path, ref: Path, injected: dict, n_shards: int) -> dict:
    m, r = shards.read_manifest(str(out)), shards.read_manifest(str(ref))
    per_shard_ok = [a["sha256"] == b["sha256"] for a, b in zip(m["shards"], r["shards"])]
    invariant = all(e["input_count"] == e["output_count"] + len(e["quarantined"]) for e in m["shards"])
    quarantined = {(e["index"], q["key"]) for e in m["shards"] for q in e["quarantined"]}
    expected = {(i, k) for i, faults in injected.items() for k, _ in faults}
    kept = 0
    for e in m["shards"]:
        if e.get("quarantine"):
            with tarfile.open(out / e["quarantine"]) as tf:
                kept += sum(1 for mb in tf.getmembers() if mb.name.endswith(".quarantine.json"))
    return {"complete": m["complete"], "shards": len(m["shards"]), "shards_expected": n_shards,
            "samples_in": m["totals"]["input_count"], "samples_out": m["totals"]["output_count"],
            "quarantined": m["totals"]["quarantined"], "injected": len(expected),
            "quarantined_equals_injected": quarantined == expected, "kept_in_quarantine_shards": kept,
            "invariant_in_eq_out_plus_quarantined": invariant,
            "good_output_equals_fault_free": all(per_shard_ok) and len(per_shard_ok) == n_shards,
            "reference_samples_out": r["totals"]["output_count"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.01, help="fraction of bad samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=4)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--work", default="/tmp/purify-soak")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "soak"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--kill-actor", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    import shutil

    import torch
    from _machine import machine_facts

    from purify_pipeline import DVAE, DVAEConfig, Purifier

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n_shards = max(1, a.images // a.per_shard)
    t0 = time.perf_counter()
    injected = build_inputs(Path(a.data), n_shards, a.per_shard, work, a.rate, a.seed)
    build_s = time.perf_counter() - t0
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("tiny")
    ckpt = str(work / "ckpt-tiny")
    Purifier(DVAE(cfg), DVAE(cfg)).save(ckpt)  # untrained, seeded: the job's plumbing does not need trained weights
    pattern = "train-{%06d..%06d}.tar" % (0, n_shards - 1)
    common = ["--checkpoint", ckpt, "--actors", str(a.actors), "--ray-cpus", str(a.ray_cpus)]
    ref, out = work / "out-fault-free", work / "out-faulty"
    runs = {"fault_free": _job(["--inputs", str(work / "clean" / pattern), "--output", str(ref), *common])}
    kill_at = max(1, n_shards // 3)
    runs["faulty_killed_driver"] = _job(["--inputs", str(work / "faulty" / pattern), "--output", str(out), *common],
                                        kill_after_shards=kill_at, out=out)  # fmt: skip
    shards_at_kill = len(shards.read_manifest(str(out))["shards"])
    runs["faulty_resumed_with_killed_actor"] = _job(["--inputs", str(work / "faulty" / pattern), "--output", str(out),
                                                     "--kill-actor", *common])  # fmt: skip
    summary = json.loads((out / "run-summary.json").read_text())
    result = {"images_requested": a.images, "shards": n_shards, "per_shard": a.per_shard, "fault_rate": a.rate,
              "fault_kinds": {k: sum(1 for f in injected.values() for _, kk in f if kk == k) for k in KINDS},
              "build_inputs_s": round(build_s, 1), "runs": runs, "driver_killed_after_shards": shards_at_kill,
              "resumed_shards": summary["shards_resumed"], "killed_actor_pid": summary["killed_actor_pid"],
              "checks": check(out, ref, injected, n_shards), "machine": machine_facts("cpu")}  # fmt: skip
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    tag = f"soak-{n_shards * a.per_shard}"
    (res / f"{tag}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (res / f"{tag}.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    c, mf = r["checks"], r["machine"]
    rows = "\n".join(f"| {k} | {v['seconds']:.0f} | {'yes' if v['killed'] else 'no'} | {v['rc']} | {v['attempts']} |"
                     for k, v in r["runs"].items())  # fmt: skip
    return f"""# purify_shards soak: {r['shards']} shards x {r['per_shard']} CIFAR-10 images, {r['fault_rate']:.0%} faults

Command: `{mf['command']}`

| run | seconds | SIGKILLed | exit code | attempts |
|---|---|---|---|---|
{rows}

| check | value |
|---|---|
| samples in (tar groups) | {c['samples_in']} |
| samples out | {c['samples_out']} |
| quarantined | {c['quarantined']} (injected {c['injected']}: {r['fault_kinds']}) |
| quarantined == injected (same keys) | {c['quarantined_equals_injected']} |
| quarantined samples kept in quarantine shards | {c['kept_in_quarantine_shards']} |
| in == out + quarantined, every shard | {c['invariant_in_eq_out_plus_quarantined']} |
| every output shard sha256 == fault-free run's | {c['good_output_equals_fault_free']} |
| manifest complete | {c['complete']} ({c['shards']} / {c['shards_expected']} shards) |
| driver SIGKILLed after / shards resumed | {r['driver_killed_after_shards']} / {r['resumed_shards']} |
| actor SIGKILLed in the resumed run (pid) | {r['killed_actor_pid']} |

Machine: {mf['cpu_model']}, {mf['cpu_count']} CPUs, torch {mf['torch']}, ray {mf['ray']}, Python {mf['python']};
load average at start {', '.join(f'{x:.1f}' for x in mf['loadavg_at_start'])} (shared machine: other work was running).
Checkpoint: untrained, seeded `tiny` preset; {r['runs'] and 'each run a separate process with its own local Ray'}.
"""


if __name__ == "__main__":
    main()
