"""The study with several seeds, in both settings: seed spread, intervals over held-out groups, wins and losses.

Trains every fine-tuned variant with each seed (same data, same base: the demo's) in each setting — unseen cell
types (`data/wound_healing.toml`) and unseen mice (`data/wound_healing_mice.toml`) — predicts one split, and
evaluates it beside the baselines and a *ceiling*: the simulation's known Burn effect per cell type and day
(``uns["ground_truth"]``) used as the prediction (below 1: each real group is a finite sample of cells from mice
with their own batch effects).

Per setting and model it reports the mean ± standard deviation over seeds, the 95 % bootstrap interval over
held-out groups of the seed-averaged group scores, and, against the best baseline of each metric, the paired
difference with its interval and per-group wins / losses. Choose settings with ``--split val`` (the default);
score the test split once, with the settings fixed, ``--split test``.

    .venv/bin/python analysis/seeds.py [--split val|test] [--seeds 0 1 2] [--variants st_lora ...]
                                       [--settings unseen_cell_type unseen_mouse] [key=value ...]

Needs the demo's data and base (`make demo`, or `stlib make-data` + `stlib pretrain` + `stlib velocity`).
Writes the table to --out (default analysis/seeds_<split>.md) and every group score to <work>/<tag>/groups.csv.
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
SETTINGS = {"unseen_cell_type": "wound_healing.toml", "unseen_mouse": "wound_healing_mice.toml"}
METRICS = ("gene_correlation", "emb_gene_correlation", "de_overlap_50", "de_direction_50", "mse", "cell_distance")


def train_and_predict(variant: str, seed: int, toml: Path, split: str, extra: list[str], work: Path) -> Path:
    from stlib.config import load_config
    from stlib.evaluate.predict import predict_run
    from stlib.train.run import train

    overrides = [f"training.seed={seed}", f"output_dir={work / 'runs'}", "training.progress_bar=false",
                 f"data.toml_config_path={toml}", *extra]
    run_dir = train(load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides)
    return predict_run(run_dir, split=split, out_dir=work / "predictions")[0]


def ceiling(real_path: Path, data_path: Path) -> pd.DataFrame:
    """Per group: the metrics of predicting its shift as the simulation's true effect for its cell type and day."""
    from stlib.evaluate.layout import ControlIndex, group_table, mean_rows, read_settings, representation
    from stlib.evaluate.metrics import de_scores, pearson

    real = ad.read_h5ad(real_path)
    truth = ad.read_h5ad(data_path, backed="r").uns["ground_truth"]
    s = read_settings(real)
    effect = np.asarray(truth["effect_log1p" if s.space == "gene" else "effect_embedding"])  # [C, T, G]
    emb_effect = np.asarray(truth["effect_embedding"])  # [C, T, D]
    cell_types, days = [str(c) for c in truth["cell_types"]], [int(d) for d in truth["days"]]
    x, emb = representation(real, "X"), representation(real, s.embed_key)
    controls = ControlIndex(real, s)
    ids = real.obs["group_id"].astype(str).to_numpy()
    rows = []
    for gid, g in group_table(real, s).iterrows():
        members, ctrl = np.flatnonzero(ids == gid), controls(g["cell_type"], g["time"])
        c, t = cell_types.index(g["cell_type"]), days.index(int(g["time"]))
        real_shift = mean_rows(x, members) - mean_rows(x, ctrl)
        rows.append({"group_id": gid, "gene_correlation": pearson(effect[c, t], real_shift),
                     "emb_gene_correlation": pearson(emb_effect[c, t], mean_rows(emb, members) - mean_rows(emb, ctrl)),
                     **(de_scores(effect[c, t], real_shift) if s.space == "gene" else {})})
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def setting_table(groups: pd.DataFrame, ceiling_groups: pd.DataFrame, metrics: list[str]) -> list[str]:
    """Markdown rows for one setting: per model mean ± sd over seeds, [interval over groups], vs best baseline."""
    from stlib.evaluate.baselines import BASELINES
    from stlib.evaluate.intervals import bootstrap_interval, paired_difference
    from stlib.evaluate.metrics import HIGHER_IS_BETTER

    per_seed = groups.groupby(["model", "seed"], sort=False)[metrics].mean()
    per_group = groups.groupby(["model", "group_id"], sort=False)[metrics].mean()  # seed-averaged group scores
    models = list(pd.unique(groups["model"]))
    best = {}
    for m in metrics:
        sign = 1 if HIGHER_IS_BETTER.get(m, True) else -1
        means = {b: per_seed.loc[b, m].mean() for b in BASELINES if b in models and per_seed.loc[b, m].notna().any()}
        best[m] = max(means, key=lambda b: sign * means[b]) if means else None
    header = "| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
    lines = [header]
    for model in models:
        cells = []
        for m in metrics:
            values = per_group.loc[model, m]
            lo, hi = bootstrap_interval(values)
            cell = f"{_cell(per_seed.loc[model, m])} [{lo:.2f}, {hi:.2f}]"
            if model not in BASELINES and best[m]:
                sign = 1 if HIGHER_IS_BETTER.get(m, True) else -1
                both = pd.concat([values, per_group.loc[best[m], m]], axis=1, keys=["a", "b"]).dropna()
                d = paired_difference(sign * both["a"], sign * both["b"])
                cell += f"<br>vs {best[m]}: {d['diff']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}] {d['wins']}–{d['losses']}"
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if len(ceiling_groups):
        top = []
        for m in metrics:
            if m in ceiling_groups:
                lo, hi = bootstrap_interval(ceiling_groups[m])
                top.append(f"{ceiling_groups[m].mean():.3f} [{lo:.2f}, {hi:.2f}]")
            else:
                top.append("–")
        lines.append("| ceiling (true effect) | " + " | ".join(top) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", default=None, help="default: analysis/seeds_<split>.md")
    parser.add_argument("--work", type=Path, default=WORK, help="run dirs and predictions, one folder per overrides")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. training.lr=1e-3)")
    args = parser.parse_args()

    import torch

    from stlib.evaluate.metrics import evaluate_groups

    torch.set_num_threads(1)
    started = time.time()
    tag = hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:10] if args.overrides else "default"
    work = args.work / tag / args.split
    tables, ceilings = [], {}
    for setting in args.settings:
        toml = args.data_dir / SETTINGS[setting]
        for seed in args.seeds:
            preds = []
            for variant in args.variants:
                print(f"[seeds] {setting}, seed {seed}: {variant}", flush=True)
                preds.append(train_and_predict(variant, seed, toml, args.split, args.overrides,
                                               work / setting / f"seed{seed}"))
            tables.append(evaluate_groups(preds).assign(setting=setting, seed=seed))
        real_path = Path(str(preds[0]).replace("_pred.h5ad", "_real.h5ad"))
        ceilings[setting] = ceiling(real_path, args.data_dir / "wound_healing.h5ad")
    groups = pd.concat(tables, ignore_index=True)
    groups.to_csv(work / "groups.csv", index=False)

    metrics = [m for m in METRICS if m in groups.columns and groups[m].notna().any()]
    body = []
    for setting in args.settings:
        table = groups[groups["setting"] == setting]
        body += [f"## {setting} ({table['group_id'].nunique()} held-out groups, {args.split} split)", "",
                 *setting_table(table, ceilings[setting], metrics), ""]
    command = (f".venv/bin/python analysis/seeds.py --split {args.split} --seeds {' '.join(map(str, args.seeds))}"
               f"{''.join(' ' + o for o in args.overrides)}")
    text = "\n".join([
        f"# The study over seeds: {args.split} split", "",
        (f"{datetime.date.today()} · {platform.processor() or platform.machine()} · python {sys.version.split()[0]} · "
         f"seeds {args.seeds} · {time.time() - started:.0f} s"), "",
        f"Command: `{command}`", "",
        ("Each cell: mean ± standard deviation over seeds [95 % bootstrap interval over held-out groups of the "
         "seed-averaged group scores]; for a model, below: its paired difference to the best baseline of that metric "
         "(positive = better; for mse and cell_distance, lower is better) [interval], and per-group wins–losses. "
         "Gene space for the first metrics, emb_* in the embedding. Baselines do not depend on the seed."), "",
        *body,
    ])
    out = Path(args.out or REPO / "analysis" / f"seeds_{args.split}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
