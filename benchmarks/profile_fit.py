"""Where a D-VAE training step spends its CPU time: a torch.profiler breakdown of `cpu`-preset steps.

    python benchmarks/profile_fit.py          # writes benchmarks/results/speed/profile-<cpu>.{json,md}

For each precision (fp32; bf16 where the CPU has it natively) and batch (stage 1's 128, stage 2's 32): the
share of the step's self CPU time per op group (convolutions and their backward, the latent's element-wise work,
batch/instance norm, dtype and layout copies, the noise draw, optimizer), the FLOPs per image (FlopCounterMode),
the achieved GFLOP/s against this machine's 2048x2048 fp32 matmul rate; and the two latent-noise generators of
purification (per-sample seeded torch generators, the counter-based one used on accelerators) in images/s.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402

from purify_pipeline import DVAE, DVAEConfig  # noqa: E402
from purify_pipeline.dvae.losses import dvae_loss  # noqa: E402
from purify_pipeline.dvae.noise import sample_noise  # noqa: E402
from purify_pipeline.dvae.train import cpu_has_native_bf16  # noqa: E402

GROUPS = {"convolution (backward)": ("convolution_backward",),  # before the forward's "conv", which it contains
          "convolution (forward)": ("mkldnn_convolution", "_convolution", "conv"),
          "batch/instance norm": ("batch_norm", "instance_norm"),
          "dtype/layout copies": ("copy_", "to_copy", "clone", "contiguous"),
          "noise draw": ("normal_",),
          "optimizer": ("_foreach", "adam"),
          "element-wise": ("mul", "add", "sub", "exp", "pow", "neg", "addcmul", "clamp", "threshold", "sigmoid",
                           "norm", "sum", "mean", "div")}  # fmt: skip


def group(op: str) -> str:
    name = op.lower()
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return "other"


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    cfg = DVAEConfig.preset("cpu")
    rows = []
    for bf16 in [False] + ([True] if cpu_has_native_bf16() else []):
        for bs in (cfg.batch_size_for(1), cfg.batch_size_for(2)):
            torch.manual_seed(0)
            model = DVAE(cfg).to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            x = torch.rand(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, cfg.num_classes, (bs,))

            def step() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x, y)
                loss, _ = dvae_loss(out._replace(x_hat=out.x_hat.float(), p_hat=out.p_hat.float()), x, tau=0.5, epoch=12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()

            for _ in range(2):
                step()
            fc = FlopCounterMode(display=False)
            with fc:
                step()
            n = 4
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sec = (time.perf_counter() - t0) / n
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(3):
                    step()
            shares: dict[str, float] = {}
            for e in p.key_averages():
                shares[group(e.key)] = shares.get(group(e.key), 0.0) + e.self_cpu_time_total
            total = sum(shares.values())
            rows.append({"precision": "bf16" if bf16 else "fp32", "batch": bs, "samples_per_s": bs / sec,
                         "gflop_per_image": fc.get_total_flops() / bs / 1e9,
                         "achieved_gflop_s": fc.get_total_flops() / sec / 1e9,
                         "shares": {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}})  # fmt: skip
            print(rows[-1], flush=True)
    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    matmul = 2 * 2048**3 * 10 / (time.perf_counter() - t0) / 1e9
    ids = list(range(512))
    noise = {}
    for name, fn in (("counter-based (every device)", sample_noise),):
        fn(0, ids[:8], (cfg.latent_channels, 16, 16))
        t0 = time.perf_counter()
        fn(0, ids, (cfg.latent_channels, 16, 16))
        noise[name] = len(ids) / (time.perf_counter() - t0)
    facts = machine_facts("cpu")
    facts["loadavg_at_end"] = os.getloadavg()
    res = {"rows": rows, "fp32_matmul_gflop_s": matmul, "noise_images_per_s": noise, "machine": facts}
    out = REPO / "benchmarks" / "results" / "speed"
    out.mkdir(parents=True, exist_ok=True)
    tag = facts["cpu_capability"].lower()
    (out / f"profile-{tag}.json").write_text(json.dumps(res, indent=1))
    groups = list(GROUPS) + ["other"]
    lines = [f"# Where a `cpu`-preset training step spends its time ({facts['cpu_model']}, {facts['cpu_capability']})", "",
             f"Command: `{facts['command']}`; {facts['cpu_count']} CPUs, torch {facts['torch']}; load average at start "
             f"{facts['loadavg_at_start'][0]:.1f}, at end {facts['loadavg_at_end'][0]:.1f}. Code as committed (fused "
             "latent, channels-last).", "",
             "| precision | batch | samples/s | GFLOP/image | achieved GFLOP/s | " + " | ".join(groups) + " |",
             "|---|---|---|---|---|" + "---|" * len(groups)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['samples_per_s']:.1f} | {r['gflop_per_image']:.2f} | "
                     f"{r['achieved_gflop_s']:.0f} | " + " | ".join(f"{100 * r['shares'].get(g, 0):.0f}%" for g in groups)
                     + " |")  # fmt: skip
    lines += ["", f"fp32 matmul (2048x2048) on this machine: {matmul:.0f} GFLOP/s.", "",
              "Latent noise for purification (3 x 256 x 16 x 16 normals per image): " +
              "; ".join(f"{k} {v:.0f} images/s" for k, v in noise.items()) + "."]  # fmt: skip
    (out / f"profile-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
