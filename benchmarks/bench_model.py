"""Training-step throughput of StateTransitionModel at the anchor configuration (CPU or GPU).

Reference configuration (study anchors): hidden 128, 8 layers, 8 heads x 16, FFN 512, set 64, batch 8,
64-d input, 200-gene decoder, energy loss on cells and genes (as State trains), AdamW. arc-state 0.11.1
on the 2-core reference machine: median 3.9 steps/s (~2000 cells/s); the goal is >= 1.5x that.

    python benchmarks/bench_model.py [--threads 2] [--steps 60] [--repeats 5] [--profile]

On a machine shared with other busy processes, OpenMP's default spin-waiting makes 2 threads several times
slower than 1 (threads spin while their partner is descheduled); run with OMP_WAIT_POLICY=PASSIVE there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from stlib.config import ModelConfig
from stlib.losses.distributional import set_loss
from stlib.models.state_transition import StateTransitionModel

B, S, D, P, G = 8, 64, 64, 2, 200


def build(device: str, fused: bool = False):
    cfg = ModelConfig(hidden_dim=128, cell_set_len=S, n_layers=8, n_heads=8, head_dim=16, intermediate_size=512,
                      dropout=0.0, decoder_dropout=0.1)
    model = StateTransitionModel(cfg, input_dim=D, pert_dim=P, gene_dim=G).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=5e-4,
                            fused=fused or None)
    g = torch.Generator().manual_seed(0)
    batch = {
        "basal": torch.randn(B, S, D, generator=g),
        "pert": torch.nn.functional.one_hot(torch.randint(0, P, (B,), generator=g), P).float()[:, None].expand(B, S, P),
        "target": torch.randn(B, S, D, generator=g) + 0.5,
        "genes": torch.rand(B, S, G, generator=g),
    }
    return model, opt, {k: v.contiguous().to(device) for k, v in batch.items()}


def step(model, opt, batch) -> float:
    out = model(batch["basal"], batch["pert"])
    loss = set_loss(out["pred"], batch["target"], "energy").mean() + set_loss(out["genes"], batch["genes"], "energy").mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW kernel (CPU and CUDA)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 10 steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, opt, batch = build(args.device, args.fused_adamw)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(10):  # warm-up
        step(model, opt, batch)
    sync()
    rates, cpu_per_step = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step(model, opt, batch)
        sync()
        rates.append(args.steps / (time.perf_counter() - t0))
        cpu_per_step.append((time.process_time() - c0) / args.steps)
    med = statistics.median(rates)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} trainable={n_params:,} "
          f"fused_adamw={args.fused_adamw} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    print(f"steps/s: median {med:.2f} (min {min(rates):.2f}, max {max(rates):.2f}, {args.repeats}x{args.steps} steps)")
    print(f"cells/s: {med * B * S:.0f}   vs arc-state 3.9 steps/s: {med / 3.9:.2f}x")
    # CPU seconds per step (all threads): a load-independent cost when other processes share the cores
    print(f"CPU s/step: median {statistics.median(cpu_per_step):.3f}; os.getloadavg() = {os.getloadavg()}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step(model, opt, batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
