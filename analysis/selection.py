"""Choose the configs' settings on the validation split only: each candidate trained and scored on `val`, both settings.

The candidates are the settings the configs fix by hand — the learning rate, the velocity loss weight, velocity
displacement and the gains' learning-rate multiple. Each is trained with a few seeds in both settings (unseen cell
type: the validation cell type; unseen mice: the validation mice) and scored on the validation groups; the pick
is the best mean validation score (gene correlation, both settings pooled over groups). The test split is not read.

    .venv/bin/python analysis/selection.py [--seeds 0 1] [--only lr velocity]

Needs the demo's data and base. Writes analysis/selection.md and <work>/selection_groups.csv.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import pandas as pd
from seeds import REPO, SETTINGS, WORK, train_and_predict

# question -> (variant, candidate overrides); the first candidate of each is what configs/ uses today
CANDIDATES = {
    "lr": ("st_lora", [["training.lr=5e-3"], ["training.lr=2e-3"], ["training.lr=1e-2"]]),
    "velocity": ("st_lora_velocity", [
        ["velocity.loss_weight=0.01"], ["velocity.loss_weight=0"], ["velocity.loss_weight=0.1"],
        ["velocity.loss_weight=0.01", "velocity.displacement=false"],
        ["velocity.loss_weight=0.01", "velocity.gain_lr_scale=1"],
    ]),
}
SCORE = "gene_correlation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--work", type=Path, default=WORK.parent / "selection")
    parser.add_argument("--out", type=Path, default=REPO / "analysis" / "selection.md")
    args = parser.parse_args()

    import torch

    from stlib.evaluate.intervals import bootstrap_interval
    from stlib.evaluate.metrics import evaluate_groups

    torch.set_num_threads(1)
    started = time.time()
    tables = []
    for question in args.only:
        variant, candidates = CANDIDATES[question]
        for overrides in candidates:
            label = " ".join(overrides)
            for setting, toml in SETTINGS.items():
                for seed in args.seeds:
                    print(f"[select] {question}: {variant} {label}, {setting}, seed {seed}", flush=True)
                    work = args.work / variant / label.replace(" ", "_").replace("=", "-") / setting / f"seed{seed}"
                    pred = train_and_predict(variant, seed, args.data_dir / toml, "val", overrides, work)
                    groups = evaluate_groups([pred], baselines_on_first=False)
                    tables.append(groups.assign(question=question, candidate=label, setting=setting, seed=seed))
    groups = pd.concat(tables, ignore_index=True)
    args.work.mkdir(parents=True, exist_ok=True)
    groups.to_csv(args.work / "selection_groups.csv", index=False)

    lines = []
    for question in args.only:
        table = groups[groups["question"] == question]
        lines += [f"## {question} ({CANDIDATES[question][0]})", "",
                  f"| candidate | {SCORE} unseen_cell_type | {SCORE} unseen_mouse | pooled [95 % interval] |",
                  "|---|---|---|---|"]
        pooled = {}
        for label, rows in table.groupby("candidate", sort=False):
            by_setting = rows.groupby("setting")[SCORE].mean()
            per_group = rows.groupby(["setting", "group_id"])[SCORE].mean()  # seed-averaged
            lo, hi = bootstrap_interval(per_group)
            pooled[label] = per_group.mean()
            lines.append(f"| `{label}` | {by_setting.get('unseen_cell_type', float('nan')):.3f} | "
                         f"{by_setting.get('unseen_mouse', float('nan')):.3f} | {per_group.mean():.3f} "
                         f"[{lo:.3f}, {hi:.3f}] |")
        pick = max(pooled, key=pooled.get)
        current = " ".join(CANDIDATES[question][1][0])
        lines += ["", f"Best on validation: `{pick}`" + (" (what configs/ uses)." if pick == current else
                                                          f" (configs/ uses `{current}`)."), ""]
    text = "\n".join([
        "# Settings chosen on the validation split", "",
        (f"{datetime.date.today()} · {platform.processor() or platform.machine()} · python {sys.version.split()[0]} · "
         f"seeds {args.seeds} · {time.time() - started:.0f} s"), "",
        f"Command: `.venv/bin/python analysis/selection.py --seeds {' '.join(map(str, args.seeds))}`", "",
        (f"Mean validation {SCORE} (gene space) per setting over seeds and groups; pooled: the mean over every "
         "validation group of both settings (seed-averaged) with its 95 % bootstrap interval over those groups. "
         "The test split is never predicted here."), "",
        *lines,
    ])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
