"""How much of a difference between variants is seed noise, and how close anyone can get on the embedded default.

Trains every fine-tuned variant with several seeds (same data, same base: the demo's), predicts the test split
and evaluates, then prints per variant the mean, standard deviation and range of the headline metrics, beside
the two baselines and a *ceiling*: the simulation's known Burn effect per cell type and day
(``uns["ground_truth"]``) used as the prediction. The ceiling is below 1 because each real group is a finite
sample of cells from mice with their own batch effects; the mean-shift baseline's distance to it is how much
room a model has.

    .venv/bin/python analysis/seeds.py [--seeds 0 1 2] [--variants st_lora ...] [--max-steps 300]

Needs the demo's data and base (`make demo`, or `stlib make-data` + `stlib pretrain` + `stlib velocity`).
Writes analysis/seeds.md (the table, machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "analysis" / ".work" / "seeds"
VARIANTS = ("st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")
METRICS = ("gene_correlation", "direction_cosine", "emb_gene_correlation", "emb_direction_cosine", "cell_distance", "mse")


def train_and_predict(variant: str, seed: int, max_steps: int | None, extra: list[str], work: Path) -> Path:
    from stlib.config import load_config
    from stlib.evaluate.predict import predict_run
    from stlib.train.run import train

    work = work / f"seed{seed}"
    overrides = [f"training.seed={seed}", f"output_dir={work / 'runs'}", "training.progress_bar=false", *extra]
    if max_steps is not None:
        overrides.append(f"training.max_steps={max_steps}")
    run_dir = train(load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides)
    return predict_run(run_dir, out_dir=work / "predictions")[0]


def ceiling(real_path: Path, data_path: Path) -> dict[str, float]:
    """Metrics of predicting each group's shift as the simulation's true mean effect for its cell type and day."""
    from stlib.evaluate.layout import ControlIndex, group_table, mean_rows, read_settings, representation
    from stlib.evaluate.metrics import direction_cosine, pearson

    real = ad.read_h5ad(real_path)
    truth = ad.read_h5ad(data_path, backed="r").uns["ground_truth"]
    s = read_settings(real)
    effect = np.asarray(truth["effect_log1p" if s.space == "gene" else "effect_embedding"])  # [C, T, G]
    emb_effect = np.asarray(truth["effect_embedding"])  # [C, T, D]
    cell_types, days = [str(c) for c in truth["cell_types"]], [int(d) for d in truth["days"]]
    x, emb = representation(real, "X"), representation(real, s.embed_key)
    controls = ControlIndex(real, s)
    ids = real.obs["group_id"].astype(str).to_numpy()
    scores: dict[str, list[float]] = {"gene_correlation": [], "direction_cosine": [], "emb_direction_cosine": []}
    for gid, g in group_table(real, s).iterrows():
        members, ctrl = np.flatnonzero(ids == gid), controls(g["cell_type"], g["time"])
        c, t = cell_types.index(g["cell_type"]), days.index(int(g["time"]))
        real_shift = mean_rows(x, members) - mean_rows(x, ctrl)
        scores["gene_correlation"].append(pearson(effect[c, t], real_shift))
        scores["direction_cosine"].append(direction_cosine(effect[c, t], real_shift))
        scores["emb_direction_cosine"].append(direction_cosine(emb_effect[c, t],
                                                               mean_rows(emb, members) - mean_rows(emb, ctrl)))
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=None, help="default: the configs' (300)")
    parser.add_argument("--data", default=str(REPO / "data" / "wound_healing.h5ad"))
    parser.add_argument("--out", default=str(REPO / "analysis" / "seeds.md"))
    parser.add_argument("--work", type=Path, default=WORK, help="run dirs and predictions, one folder per overrides")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. model.time_encoder=true)")
    args = parser.parse_args()

    import torch

    from stlib.evaluate.metrics import evaluate_files

    torch.set_num_threads(1)
    started = time.time()
    tag = hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:10] if args.overrides else "default"
    rows = []
    for seed in args.seeds:
        preds = []
        for variant in args.variants:
            print(f"[seeds] seed {seed}: {variant}", flush=True)
            preds.append(train_and_predict(variant, seed, args.max_steps, args.overrides, args.work / tag))
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
        (f"Command: `.venv/bin/python analysis/seeds.py --seeds {' '.join(map(str, args.seeds))}"
         f"{''.join(' ' + o for o in args.overrides)}`"), "",
        ("Mean ± standard deviation over seeds (min–max); baselines do not depend on the seed. Space of the first "
         f"columns: {table['space'].iloc[0]}; emb_* in the embedding."), "",
        header, *lines, "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
