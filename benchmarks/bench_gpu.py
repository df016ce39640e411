"""Training speed of every fine-tuning variant on one CUDA GPU, in 32-true and bf16-mixed.

Generates a smaller embedded default (its velocity the simulation's true one: no scvelo needed), pretrains a base
there, then times each variant's fine-tune (steps/s over the whole `train` call, start-up included) and its peak
GPU memory. Correctness on a GPU (every variant trains, predicts, evaluates; mHC CPU vs GPU) is tests/test_gpu.py;
the mHC block alone on a GPU: `bench_mhc.py --device cuda`. `--dry-run` runs the same steps on the CPU, to test
this script. Prints a table and writes it as JSON; results: gpu.md.

    python benchmarks/bench_gpu.py [--steps 100] [--cells 3000] [--out benchmarks/.work/gpu.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")


def versions(device: str) -> dict[str, str]:
    import anndata
    import lightning
    import peft

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run)",
            "lightning": lightning.__version__, "peft": peft.__version__, "anndata": anndata.__version__}


def timed_train(config: str, overrides: list[str], device: str) -> tuple[Path, float, float]:
    """(run dir, seconds, peak GPU memory in MiB; 0 on the CPU) of one `train` call."""
    from stlib.config import load_config
    from stlib.train.run import train

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_dir = train(load_config(REPO / config, overrides), overrides)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return run_dir, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".work" / "gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="run the same steps on CPU (to test this script)")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("no CUDA GPU here: this benchmark is for a GPU machine (--dry-run runs it on CPU)")
    device = "cpu" if args.dry_run else "cuda"

    from stlib.data.synthetic import use_true_velocity, write_default_data

    report: dict = {"versions": versions(device)}
    print(json.dumps(report["versions"]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="stlib_gpu_"))
    started = time.perf_counter()
    study = root / "study"
    write_default_data(study / "data", n_cells=args.cells, n_source_cells=args.cells)
    use_true_velocity(study / "data" / "wound_healing.h5ad")
    report["make_data_s"] = round(time.perf_counter() - started, 1)
    common = ["training.devices=1", f"training.accelerator={'cpu' if args.dry_run else 'gpu'}",
              "training.progress_bar=false", f"output_dir={root / 'runs'}"]
    base, seconds, peak = timed_train("configs/pretrain.yaml", [
        *common, f"data.toml_config_path={study / 'data' / 'source_perturbations.toml'}", "name=base",
        f"training.max_steps={2 * args.steps}"], device)
    report["pretrain"] = {"steps": 2 * args.steps, "seconds": round(seconds, 1), "peak_mib": round(peak)}
    rows = []
    for precision in ("32-true",) if args.dry_run else args.precisions:
        for variant in VARIANTS:
            _, seconds, peak = timed_train(f"configs/variants/{variant}.yaml", [
                *common, f"data.toml_config_path={study / 'data' / 'wound_healing.toml'}", f"model.init_from={base}",
                f"name={variant}_{precision.split('-')[0]}", f"training.max_steps={args.steps}",
                f"training.precision={precision}", "model.velocity_warmup_steps=20"], device)
            rows.append({"variant": variant, "precision": precision, "seconds": round(seconds, 1),
                         "steps_per_s": round(args.steps / seconds, 1), "peak_mib": round(peak)})
            print(rows[-1], flush=True)
    report["variants"] = rows
    print("\n| variant | precision | s | steps/s | peak MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['precision']} | {r['seconds']:.1f} | {r['steps_per_s']:.1f} | {r['peak_mib']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
