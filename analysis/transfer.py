"""What does a fine-tuned model predict for a cell type it never saw? (embedding space, after `make demo`)

For each held-out cell type, the model's mean predicted Burn shift (over its groups; each measured from the
controls its predictions were made from, as the metrics do) is regressed on the training cell types' real
shifts: the weights say which training types it resembles, R^2 how much of it they explain. The real held-out
shift gets the same regression. Then, per group, the Pearson r with the real shift of a blend
(1 - w) x model + w x mean_shift (both unit length): if the model carried what the training mean shift lacks,
some w < 1 would beat w = 1.

    .venv/bin/python analysis/transfer.py [--predictions results/predictions] [--models st_lora ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
from study import DATA, load_study, train_type_shifts

from stlib.evaluate.layout import (
    GROUP_KEY,
    ControlIndex,
    control_mask,
    group_table,
    mean_rows,
    read_settings,
    representation,
    train_shift,
)
from stlib.evaluate.metrics import BasalRows, pearson

BLENDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MODELS = ("st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")


def group_shifts(pred: ad.AnnData, real: ad.AnnData) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """group id -> (cell type, predicted shift, real shift) in the embedding, as stlib's metrics take them."""
    s = read_settings(real)
    controls, basal = ControlIndex(real, s), BasalRows(pred, real)
    pred_emb, real_emb = representation(pred, s.embed_key), representation(real, s.embed_key)
    pred_ids = np.where(control_mask(pred, s), "", pred.obs[GROUP_KEY].astype(str).to_numpy())
    real_ids = np.where(control_mask(real, s), "", real.obs[GROUP_KEY].astype(str).to_numpy())
    out = {}
    for gid, g in group_table(real, s).iterrows():
        p_idx, r_idx = np.flatnonzero(pred_ids == gid), np.flatnonzero(real_ids == gid)
        ctrl = mean_rows(real_emb, controls(g["cell_type"], g["time"]))
        out[gid] = (g["cell_type"], mean_rows(pred_emb, p_idx) - basal.control_mean(real_emb, p_idx, ctrl),
                    mean_rows(real_emb, r_idx) - ctrl)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", default="results/predictions")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--data", default=str(DATA), help="the wound data; its split TOML beside it")
    args = parser.parse_args()

    dm = load_study(args.data)
    type_shifts = train_type_shifts(dm, dm.store.embed)
    basis = np.array(list(type_shifts.values()))  # [training types, D]

    def regress(shift: np.ndarray) -> str:
        weights, *_ = np.linalg.lstsq(basis.T, shift, rcond=None)
        fit = basis.T @ weights
        r2 = 1 - ((shift - fit) ** 2).sum() / ((shift - shift.mean()) ** 2).sum()
        return " ".join(f"{w:5.2f}" for w in weights) + f"   R2 {r2:.2f}"

    print(f"weights on the training types' shifts ({', '.join(type_shifts)})")
    for name in args.models:
        pred = ad.read_h5ad(Path(args.predictions) / f"{name}_pred.h5ad")
        real = ad.read_h5ad(Path(args.predictions) / f"{name}_real.h5ad")
        s = read_settings(real)
        shifts = group_shifts(pred, real)
        for cell_type in sorted({c for c, _, _ in shifts.values()}):
            model = np.mean([p for c, p, _ in shifts.values() if c == cell_type], 0)
            truth = np.mean([r for c, _, r in shifts.values() if c == cell_type], 0)
            print(f"  {name:22s} {cell_type:11s} model {regress(model)} | real {regress(truth)}")
        perts = sorted({p for p in pred.obs[s.pert_col].astype(str)} - {s.control_pert})
        mean_shift = train_shift(dict(pred.uns["stlib"]), "train_mean_shift_embedding", perts[0])
        unit = mean_shift / np.linalg.norm(mean_shift)
        blends = [np.mean([pearson((1 - w) * p / np.linalg.norm(p) + w * unit, r) for _, p, r in shifts.values()])
                  for w in BLENDS]
        print(f"  {name:22s} r with the real shift, blend weight on mean_shift: "
              + "  ".join(f"{w:.1f}: {v:.3f}" for w, v in zip(BLENDS, blends)))


if __name__ == "__main__":
    main()
