"""Speed and accuracy of our mHC against the plain residual stack (and optionally lucidrains' package).

Printed tables, not a test:
  1. fwd+bwd time of a 4-layer pre-norm transformer (hidden 128, seq 64, batch 8): plain residual vs our
     mHC (K=4, 20 Sinkhorn sweeps), at init (every token's H_res identical) and "trained" (random phi,
     alpha=1, dynamic logits ~ N(0, 1): per-token Sinkhorn has real work), through the numba kernels (CPU
     default) and the torch path; median/min/max over alternating repeats.
  2. `--compile`: the same blocks under torch.compile (inductor): plain, mHC's torch path as it is (29 graph
     breaks, at Sinkhorn's convergence checks), and mHC's torch path with a fixed 20 sweeps (tol=0: no host
     syncs, no Newton; one graph), beside the numba kernels with the same fixed sweeps; compile warm-up
     (first 3 steps, wall seconds) apart from the steady state.
  3. doubly-stochastic error of our sinkhorn_knopp vs the paper's plain exp-domain iteration (Eq. 9, 20
     sweeps) at logit scales 1, 10, 50.
`--compare-lucidrains` adds hyper-connections' mHC (`pip install hyper-connections`, own venv).
docs/decisions.md ("mHC") has the numbers and what was tried.

    python benchmarks/bench_mhc.py [--threads 1] [--device cuda] [--repeats 30] [--compile] [--compare-lucidrains]
    (lucidrains: PYTHONPATH=. benchmarks/.venv/bin/python benchmarks/bench_mhc.py --compare-lucidrains)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from stlib.adapters.mhc import ManifoldHyperConnections, MHCBackbone, sinkhorn_knopp

LAYERS, HIDDEN, SEQ, BATCH, HEADS = 4, 128, 64, 8, 8


class Layer(nn.Module):
    """Pre-norm attention + SwiGLU block exposing the two residual branches (the backbone contract)."""

    def __init__(self, d: int):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = (
            nn.Linear(d, 4 * d, bias=False),
            nn.Linear(d, 4 * d, bias=False),
            nn.Linear(4 * d, d, bias=False),
        )

    def attn_branch(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))

    def mlp_branch(self, x):
        x = self.n2(x)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Backbone(nn.Module):
    """The plain pre-norm residual stack (as stlib.models.backbone.SetTransformer)."""

    def __init__(self, d: int = HIDDEN, n_layers: int = LAYERS):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)

    def branches(self):
        return [f for layer in self.layers for f in (layer.attn_branch, layer.mlp_branch)]

    def forward(self, h):
        for f in self.branches():
            h = h + f(h)
        return self.norm(h)


class LucidrainsBackbone(Backbone):
    """The same blocks wrapped by hyper-connections' mHC (one wrapper per branch)."""

    def __init__(self, n_streams: int = 4):
        super().__init__()
        from hyper_connections import mc_get_init_and_expand_reduce_stream_functions

        init_hc, self.expand, self.reduce = mc_get_init_and_expand_reduce_stream_functions(
            n_streams, num_fracs=1, sinkhorn_iters=20
        )
        branches = self.branches()
        self.wrapped = nn.ModuleList(
            init_hc(dim=HIDDEN, branch=_Call(f), layer_index=i) for i, f in enumerate(branches)
        )

    def forward(self, h):
        h = self.expand(h)
        for block in self.wrapped:
            h = block(h)
        return self.norm(self.reduce(h))


class _Call(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = [f]  # not a submodule: the parameters belong to the layer

    def forward(self, x):
        return self.f[0](x)


def _mhc(plain: Backbone, device: str, kernel: str = "auto", trained: bool = True, tol: float = 1e-6) -> MHCBackbone:
    """A copy of `plain` wrapped in mHC; "trained": token-dependent coefficients (dynamic logits ~ N(0, 1)), so
    per-token Sinkhorn has real work."""
    copy = Backbone().to(device)
    copy.load_state_dict(plain.state_dict())
    hc = ManifoldHyperConnections(HIDDEN, 2 * LAYERS, n_streams=4, sinkhorn_tol=tol, kernel=kernel).to(device)
    if trained:
        with torch.no_grad():
            hc.phi.normal_(0, (4 * HIDDEN) ** -0.5)
            hc.alpha.fill_(1.0)
    return MHCBackbone(copy, hc)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _time(models: dict, x, repeats: int, device: str) -> tuple[dict, dict, dict]:
    """Wall ms and this thread's CPU ms per step (CPU time is less disturbed by other processes' load), and the
    wall seconds of each model's 3 warm-up steps (compilation, for compiled models)."""
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    warmup = {}
    for name, model in models.items():
        t = time.perf_counter()
        for _ in range(3):
            _step(model, x)
        warmup[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, model in models.items():  # alternate so drift hits every variant alike
            if device == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.thread_time()
            _step(model, x)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) * 1e3)
            cpu[name].append((time.thread_time() - c) * 1e3)
    return times, cpu, warmup


def _quantile(values: list[float], q: float) -> float:
    """Lower quantile: on a shared machine other jobs only ever add time, so the low end is the cleaner signal."""
    return sorted(values)[int(q * (len(values) - 1))]


def speed_table(threads: list[int], repeats: int, device: str, lucidrains: bool, compiled: bool) -> None:
    print(f"\nfwd+bwd ms: {LAYERS} layers, hidden {HIDDEN}, seq {SEQ}, batch {BATCH}, device {device}")
    print(
        f"{'threads':>7} {'variant':<36} {'median':>8} {'min':>8} {'max':>8} {'x plain':>8} {'cpu med':>8} {'x plain':>8}"
        f" {'cpu p20':>8} {'x plain':>8}"
    )
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        torch.manual_seed(0)
        plain = Backbone().to(device)
        trained = _mhc(plain, device)
        models = {"plain residual": plain, "mHC ours (init)": _mhc(plain, device, trained=False),
                  "mHC ours (trained)": trained}
        if device == "cpu":  # the same model through eager torch ops instead of the compiled CPU loops
            models["mHC ours, torch ops (trained)"] = _mhc(plain, device, kernel="torch")
        if compiled:
            if device == "cpu":  # the numba kernels with the same fixed 20 sweeps, for a like-for-like row
                models["mHC ours fixed 20 (trained)"] = _mhc(plain, device, tol=0.0)
            torch._dynamo.reset()
            models["plain residual, torch.compile"] = torch.compile(plain)
            models["mHC torch ops, torch.compile (trained)"] = torch.compile(_mhc(plain, device, kernel="torch"))
            models["mHC torch ops fixed 20, compile (trained)"] = torch.compile(
                _mhc(plain, device, kernel="torch", tol=0.0))
        if lucidrains:
            luc = LucidrainsBackbone().to(device)
            luc.load_state_dict(plain.state_dict(), strict=False)
            models["mHC lucidrains"] = luc
        x = torch.randn(BATCH, SEQ, HIDDEN, device=device)
        times, cpu, warmup = _time(models, x, repeats, device)
        base, cpu_base = statistics.median(times["plain residual"]), statistics.median(cpu["plain residual"])
        low_base = _quantile(cpu["plain residual"], 0.2)
        for name, t in times.items():
            med, cmed, low = statistics.median(t), statistics.median(cpu[name]), _quantile(cpu[name], 0.2)
            print(
                f"{n_threads:>7} {name:<36} {med:8.2f} {min(t):8.2f} {max(t):8.2f} {med / base:8.2f} "
                f"{cmed:8.2f} {cmed / cpu_base:8.2f} {low:8.2f} {low / low_base:8.2f}"
            )
        print(f"{'':>7} warm-up (first 3 steps, wall s; compilation for torch.compile): "
              + ", ".join(f"{name} {t:.1f}" for name, t in warmup.items()))
        trained(x)
        stats = trained.hyper_connections.stability_stats()
        print(f"{'':>7} trained-state stats: " + ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
        if compiled:  # what the fixed 20 sweeps give up: distance to the converged projection, per branch
            fixed = _mhc(plain, device, kernel="torch", tol=0.0)
            fixed.load_state_dict(trained.state_dict())
            fixed(x)
            gap = max((a.double() - b.double()).abs().max().item() for a, b in
                      zip(fixed.hyper_connections._last_res, trained.hyper_connections._last_res))
            error = fixed.hyper_connections.stability_stats()["h_res_max_error"]
            print(f"{'':>7} fixed 20 sweeps: H_res max doubly-stochastic error {error:.3g}, max |H_res - converged| "
                  f"{gap:.3g} (converged: tol 1e-6 + Newton)")


def paper_sinkhorn(logits: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """mHC Eq. 9: M0 = exp(logits), alternate column and row normalisation (float32)."""
    m = logits.float().exp()
    for _ in range(n_iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


def _error(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return torch.maximum((p.sum(-1) - 1).abs().amax(-1), (p.sum(-2) - 1).abs().amax(-1))


def accuracy_table(device: str, n_matrices: int = 20000) -> None:
    print(f"\ndoubly-stochastic error, {n_matrices} random 4x4 logit matrices (randn * scale), float32 in")
    print(f"{'scale':>6} {'method':<28} {'max err':>9} {'median':>9} {'>1e-4':>7} {'nan/inf':>7} {'ms':>8}")
    torch.manual_seed(0)
    for scale in (1, 10, 50):
        logits = torch.randn(n_matrices, 4, 4, device=device) * scale
        for name, fn in (("paper exp-domain, 20 it", paper_sinkhorn), ("ours (20 it + Newton)", sinkhorn_knopp)):
            t = time.perf_counter()
            p = fn(logits)
            ms = (time.perf_counter() - t) * 1e3
            err = _error(p)
            bad = (~torch.isfinite(p)).flatten(1).any(-1)
            err = err[~bad] if (~bad).any() else err
            print(
                f"{scale:>6} {name:<28} {err.max().item():9.2e} {err.median().item():9.2e} "
                f"{int((err > 1e-4).sum()):>7} {int(bad.sum()):>7} {ms:8.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-lucidrains", action="store_true", help="needs `hyper_connections` installed")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) variants")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if not args.skip_speed:
        speed_table(args.threads, args.repeats, args.device, args.compare_lucidrains, args.compile)
    if not args.skip_accuracy:
        accuracy_table(args.device)


if __name__ == "__main__":
    main()
