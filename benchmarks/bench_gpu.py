"""The study on one GPU, briefly: does every variant train, predict and evaluate there, in fp32 and bf16?

For a machine with a CUDA GPU (stlib's CI and `make demo` run on CPU). Generates a smaller embedded default,
gives it the simulation's true velocity as its velocity (scvelo need not be installed there), pretrains a base on
the GPU, fine-tunes every variant in `32-true` and `bf16-mixed` and predicts + evaluates each; checks that the
mHC block's torch path gives the same outputs and gradients on the GPU as on the CPU. Prints one table and
writes it as JSON.

    python benchmarks/gpu_check.py [--steps 100] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")


def versions(device: str) -> dict[str, str]:
    import anndata
    import geomloss
    import lightning
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)", "lightning": lightning.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "anndata": anndata.__version__,
            "geomloss": getattr(geomloss, "__version__", "?")}


def make_data(root: Path, n_cells: int) -> Path:
    """A smaller embedded default whose velocity is the simulation's truth (what scvelo estimates on CPU)."""
    import anndata as ad

    from stlib.data.io import write_h5ad
    from stlib.data.synthetic import write_default_data

    wound = write_default_data(root / "data", n_cells=n_cells, n_source_cells=n_cells)["wound_healing"]
    adata = ad.read_h5ad(wound)
    adata.obsm["velocity_X_state"] = adata.obsm["true_velocity_X_state"].copy()
    adata.obs["velocity_confidence"] = np.ones(adata.n_obs, dtype=np.float32)
    write_h5ad(adata, wound)
    return root / "data"


def train_run(config: str, overrides: list[str]) -> tuple[Path, float]:
    from stlib.config import load_config
    from stlib.train.run import train

    started = time.perf_counter()
    run_dir = train(load_config(REPO / config, overrides), overrides)
    return run_dir, time.perf_counter() - started


def final_loss(run_dir: Path) -> tuple[float, float]:
    from stlib.evaluate.tensorboard import read_scalars

    scalars = read_scalars(run_dir)
    loss = scalars[scalars.tag == "train/loss"].sort_values("step")["value"].to_numpy()
    return float(loss[: max(1, len(loss) // 5)].mean()), float(loss[-max(1, len(loss) // 5):].mean())


def mhc_parity(device: str) -> dict[str, float]:
    """The same mHC-wrapped model, weights and inputs on CPU and `device` (torch kernel): max abs differences."""
    from stlib.adapters.mhc import apply_mhc
    from stlib.config import MHCConfig, ModelConfig
    from stlib.models.state_transition import StateTransitionModel

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=64, n_layers=4, n_heads=4, intermediate_size=128, cell_set_len=32, use_mhc=True,
                      mhc=MHCConfig(kernel="torch"))
    cpu = apply_mhc(StateTransitionModel(cfg, input_dim=32, pert_dim=5), cfg.mhc).double()
    with torch.no_grad():  # move off the identity start, so the streams really mix
        for name, p in cpu.named_parameters():
            if "hyper_connections" in name:
                p.add_(0.5 * torch.randn_like(p))
    gpu = apply_mhc(StateTransitionModel(cfg, input_dim=32, pert_dim=5), cfg.mhc).double().to(device)
    gpu.load_state_dict(cpu.state_dict())
    basal = torch.randn(4, 32, 32, dtype=torch.float64)
    pert = torch.nn.functional.one_hot(torch.randint(0, 5, (4,)), 5).double()[:, None].expand(4, 32, 5).contiguous()
    out = {}
    results = []
    for model, where in ((cpu, "cpu"), (gpu, device)):
        pred = model(basal.to(where), pert.to(where))["pred"]
        pred.square().mean().backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results.append((pred.detach().cpu(), grads))
    out["pred_max_abs_diff"] = float((results[0][0] - results[1][0]).abs().max())
    out["grad_max_abs_diff"] = max(float((results[0][1][n] - results[1][1][n]).abs().max()) for n in results[0][1])
    out["grads_compared"] = len(results[0][1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="run the same steps on CPU (to test this script)")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("no CUDA GPU here: this check is for a GPU machine (--dry-run runs it on CPU)")
    device = "cpu" if args.dry_run else "cuda"

    from stlib.evaluate.metrics import evaluate_files
    from stlib.evaluate.predict import predict_run

    report: dict = {"versions": versions(device)}
    print(json.dumps(report["versions"]), flush=True)
    report["mhc_parity"] = mhc_parity(device)
    print("mHC torch path, CPU vs GPU (float64):", report["mhc_parity"], flush=True)

    root = Path(tempfile.mkdtemp(prefix="stlib_gpu_"))
    started = time.perf_counter()
    data = make_data(root, args.cells)
    report["make_data_s"] = round(time.perf_counter() - started, 1)
    common = ["training.devices=1", f"training.accelerator={'cpu' if args.dry_run else 'gpu'}",
              "training.progress_bar=false", f"output_dir={root / 'runs'}"]
    base, seconds = train_run("configs/pretrain.yaml", [
        *common, f"data.toml_config_path={data / 'source_perturbations.toml'}", "name=base",
        f"training.max_steps={2 * args.steps}"])
    report["pretrain"] = {"steps": 2 * args.steps, "seconds": round(seconds, 1), "loss_first_last": final_loss(base)}
    rows = []
    for precision in ("32-true",) if args.dry_run else args.precisions:
        for variant in VARIANTS:
            name = f"{variant}_{precision.split('-')[0]}"
            run_dir, seconds = train_run(f"configs/variants/{variant}.yaml", [
                *common, f"data.toml_config_path={data / 'wound_healing.toml'}", f"model.init_from={base}",
                f"name={name}", f"training.max_steps={args.steps}", f"training.precision={precision}",
                "model.velocity_warmup_steps=20"])
            first, last = final_loss(run_dir)
            pred_path, _ = predict_run(run_dir, out_dir=root / "predictions")
            summary, _ = evaluate_files([pred_path])
            model_row = summary[summary["model"] == name].iloc[0]
            shift = summary[summary["model"] == "mean_shift"].iloc[0]
            rows.append({"variant": variant, "precision": precision, "seconds": round(seconds, 1),
                         "steps_per_s": round(args.steps / seconds, 1), "loss_first": round(first, 4),
                         "loss_last": round(last, 4), "gene_corr": round(float(model_row["gene_correlation"]), 3),
                         "emb_corr": round(float(model_row["emb_gene_correlation"]), 3),
                         "mean_shift_gene_corr": round(float(shift["gene_correlation"]), 3)})
            print(rows[-1], flush=True)
    report["variants"] = rows
    print(f"\n{'variant':22s} {'precision':11s} {'s':>6s} {'steps/s':>8s} {'loss first->last':>18s} "
          f"{'gene corr':>9s} {'emb corr':>9s}")
    for r in rows:
        print(f"{r['variant']:22s} {r['precision']:11s} {r['seconds']:6.1f} {r['steps_per_s']:8.1f} "
              f"{r['loss_first']:8.4f} -> {r['loss_last']:.4f} {r['gene_corr']:9.3f} {r['emb_corr']:9.3f}")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
