"""How much of a difference between variants is seed noise, and how close anyone can get on the embedded default.

Trains every fine-tuned variant with several seeds (same data, same base: the demo's), predicts the test split
and evaluates, then prints per variant the mean, standard deviation and range of the headline metrics, beside
the two baselines and a *ceiling*: the simulation's known Burn effect per cell type and day
(``uns["ground_truth"]``) used as the prediction. The ceiling is below 1 because each real group is a finite
sample of cells from mice with their own batch effects; the mean-shift baseline's distance to it is how much
room a model has.

    .venv/bin/python benchmarks/bench_seeds.py [--seeds 0 1 2] [--variants st_lora ...] [--max-steps 300]

Needs the demo's data and base (`make demo`, or `stlib make-data` + `stlib pretrain` + `stlib velocity`).
Writes benchmarks/seeds.md (the table, machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work" / "seeds"
VARIANTS = ("st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")
METRICS = ("gene_correlation", "direction_cosine", "emb_gene_correlation", "emb_direction_cosine", "cell_distance", "mse")


def train_and_predict(variant: str, seed: int, max_steps: int | None, extra: list[str], tag: str) -> Path:
    from stlib.config import load_config
    from stlib.evaluate.predict import predict_run
    from stlib.train.run import train

    work = WORK / tag / f"seed{seed}"
    overrides = [f"training.seed={seed}", f"output_dir={work / 'runs'}", "training.progress_bar=false", *extra]
    if max_steps is not None:
        overrides.append(f"training.max_steps={max_steps}")
    run_dir = train(load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides)
    return predict_run(run_dir, out_dir=work / "predictions")[0]


def ceiling(real_path: Path, data_path: Path) -> dict[str, float]:
    """Metrics of predicting each group's shift as the simulation's true mean effect for its cell type and day."""
    from stlib.evaluate.metrics import direction_cosine, pearson

    real = ad.read_h5ad(real_path)
    truth = ad.read_h5ad(data_path, backed="r").uns["ground_truth"]
    s = real.uns["stlib"]
    space = s["space"]
    effect = np.asarray(truth["effect_log1p" if space == "gene" else "effect_embedding"])  # [C, T, G]
    emb_effect = np.asarray(truth["effect_embedding"])
    cell_types, days = [str(c) for c in truth["cell_types"]], [int(d) for d in truth["days"]]
    obs = real.obs
    x = np.asarray(real.X.toarray() if hasattr(real.X, "toarray") else real.X, dtype=np.float64)
    emb = np.asarray(real.obsm[s["embed_key"]], dtype=np.float64)
    control = (obs[s["pert_col"]].astype(str) == s["control_pert"]).to_numpy()
    scores: dict[str, list[float]] = {"gene_correlation": [], "direction_cosine": [], "emb_direction_cosine": []}
    for gid in pd.unique(obs.loc[~control, "group_id"].astype(str)):
        rows = (obs["group_id"].astype(str) == gid).to_numpy()
        ct, day = str(obs.loc[rows, s["cell_type_key"]].iloc[0]), int(obs.loc[rows, s["time_col"]].iloc[0])
        ctrl = control & (obs[s["cell_type_key"]].astype(str) == ct).to_numpy() & (
            obs[s["time_col"]].astype(int) == day).to_numpy()
        c, t = cell_types.index(ct), days.index(day)
        real_shift = x[rows].mean(0) - x[ctrl].mean(0)
        scores["gene_correlation"].append(pearson(effect[c, t], real_shift))
        scores["direction_cosine"].append(direction_cosine(effect[c, t], real_shift))
        scores["emb_direction_cosine"].append(direction_cosine(emb_effect[c, t], emb[rows].mean(0) - emb[ctrl].mean(0)))
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=None, help="default: the configs' (300)")
    parser.add_argument("--data", default=str(REPO / "data" / "wound_healing.h5ad"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "seeds.md"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. model.time_encoder=true)")
    args = parser.parse_args()

    import torch

    from stlib.evaluate.metrics import evaluate_files

    torch.set_num_threads(1)
    started = time.time()
    rows = []
    for seed in args.seeds:
        preds = []
        for variant in args.variants:
            print(f"[bench_seeds] seed {seed}: {variant}", flush=True)
            preds.append(train_and_predict(variant, seed, args.max_steps, args.overrides,
                                           "_".join(args.overrides) or "default"))
        summary, _ = evaluate_files(preds)
        rows.append(summary.assign(seed=seed))
    table = pd.concat(rows)
    real_path = Path(str(preds[0]).replace("_pred.h5ad", "_real.h5ad"))
    top = ceiling(real_path, Path(args.data))

    metrics = [m for m in METRICS if m in table.columns]
    lines = []
    for model, group in table.groupby("model", sort=False):
        cells = []
        for m in metrics:
            v = group[m].astype(float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f} ({v.min():.2f}–{v.max():.2f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("| ceiling (true effect) | " + " | ".join(f"{top[m]:.3f}" if m in top else "–" for m in metrics) + " |")
    header = "| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
    text = "\n".join([
        "# Seed spread of the fine-tuned variants (embedded default, held-out cell types)", "",
        (f"{datetime.date.today()} · {platform.processor() or platform.machine()} · python {sys.version.split()[0]} · "
         f"seeds {args.seeds} · {time.time() - started:.0f} s"), "",
        (f"Command: `.venv/bin/python benchmarks/bench_seeds.py --seeds {' '.join(map(str, args.seeds))}"
         f"{''.join(' ' + o for o in args.overrides)}`"), "",
        ("Mean ± standard deviation over seeds (min–max); baselines do not depend on the seed. Space of the first "
         f"columns: {table['space'].iloc[0]}; emb_* in the embedding."), "",
        header, *lines, "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
