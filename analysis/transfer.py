"""What does a fine-tuned model predict for a cell type it never saw? (embedding space, after `make demo`)

For each held-out cell type, the model's mean predicted Burn shift (over its groups; shifts from the controls
each prediction was made from) is regressed on the four training cell types' real mean shifts: the weights
say which training types it resembles, R^2 how much of it they explain. The real held-out shift gets the same
regression. Then, per group, the Pearson r with the real shift of a blend (1 - w) x model + w x mean_shift
(both unit length): if the model carried what the training mean shift lacks, some w < 1 would beat w = 1.

    .venv/bin/python benchmarks/transfer_analysis.py [--predictions results/predictions] [--models st_lora ...]
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np

BLENDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def group_shifts(pred: ad.AnnData, real: ad.AnnData) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """group id -> (cell type, predicted shift, real shift) in the embedding."""
    emb, pred_emb = real.obsm["X_state"], pred.obsm["X_state"]
    gid = real.obs["group_id"].astype(str).to_numpy()
    ct = real.obs["cell_types_simple_short"].astype(str).to_numpy()
    day = real.obs["day"].to_numpy()
    row_of = {s: i for i, s in enumerate(real.obs["source_index"].to_numpy())}
    pred_gid = pred.obs["group_id"].astype(str).to_numpy()
    out = {}
    for g in sorted(set(gid) - {"control"}):
        members = gid == g
        controls = (gid == "control") & (ct == ct[members][0]) & (day == day[members][0])
        predicted = pred_gid == g
        basal = np.array([row_of[s] for s in pred.obs["basal_index"].to_numpy()[predicted]])
        out[g] = (ct[members][0], pred_emb[predicted].mean(0) - emb[basal].mean(0),
                  emb[members].mean(0) - emb[controls].mean(0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", default="results/predictions")
    parser.add_argument("--models", nargs="+", default=["st_lora", "st_lora_mhc", "st_lora_velocity",
                                                        "st_lora_mhc_velocity"])
    parser.add_argument("--data", default="data/wound_healing.h5ad")
    args = parser.parse_args()

    data = ad.read_h5ad(args.data)
    held_out = {k.split(".", 1)[1] for k in tomllib.loads((Path(args.data).parent / "wound_healing.toml")
                                                         .read_text())["zeroshot"]}
    ct = data.obs["cell_types_simple_short"].astype(str).to_numpy()
    cond = data.obs["condition"].astype(str).to_numpy()
    train_types = sorted(set(ct) - held_out)
    emb = data.obsm["X_state"]
    basis = np.array([emb[(ct == c) & (cond == "Burn")].mean(0) - emb[(ct == c) & (cond == "Sham")].mean(0)
                      for c in train_types])  # [4, D]

    def regress(shift: np.ndarray) -> str:
        weights, *_ = np.linalg.lstsq(basis.T, shift, rcond=None)
        fit = basis.T @ weights
        r2 = 1 - ((shift - fit) ** 2).sum() / ((shift - shift.mean()) ** 2).sum()
        return " ".join(f"{w:5.2f}" for w in weights) + f"   R2 {r2:.2f}"

    print(f"weights on the training types' shifts ({', '.join(train_types)})")
    for name in args.models:
        pred = ad.read_h5ad(Path(args.predictions) / f"{name}_pred.h5ad")
        real = ad.read_h5ad(Path(args.predictions) / f"{name}_real.h5ad")
        mean_shift = np.asarray(pred.uns["stlib"]["train_mean_shift_embedding"]["Burn"])
        shifts = group_shifts(pred, real)
        for cell_type in sorted({c for c, _, _ in shifts.values()}):
            model = np.mean([p for c, p, _ in shifts.values() if c == cell_type], 0)
            truth = np.mean([r for c, _, r in shifts.values() if c == cell_type], 0)
            print(f"  {name:22s} {cell_type:11s} model {regress(model)} | real {regress(truth)}")
        blends = [np.mean([np.corrcoef((1 - w) * p / np.linalg.norm(p) + w * mean_shift / np.linalg.norm(mean_shift),
                                       r)[0, 1] for _, p, r in shifts.values()]) for w in BLENDS]
        print(f"  {name:22s} r with the real shift, blend weight on mean_shift: "
              + "  ".join(f"{w:.1f}: {v:.3f}" for w, v in zip(BLENDS, blends)))


if __name__ == "__main__":
    main()
