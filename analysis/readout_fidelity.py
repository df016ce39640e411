"""How faithfully does a gene readout turn a *known* embedding shift into genes? (embedding -> log1p genes)

For every Burn group (cell type x mouse) the real shift is known in both spaces: the group mean minus its Sham
controls' mean (same cell type and day). This reads the real *embedding* shift out into genes and prints the
mean Pearson r with the real *gene* shift, per split of cell types:
  * through a run's gene decoder, as `stlib predict` does (mean over the controls c of dec(c + shift) - dec(c));
  * through ridge regressions of expression on the embedding, fitted on the training cell types' cells, for
    several penalties (per cell, as `model.decoder_skip_ridge`).
A readout that loses here loses for every model: no prediction can score better than the real shift does.

    .venv/bin/python benchmarks/readout_fidelity.py [--run-dir results/runs/st_lora] [--data data/wound_healing.h5ad]

A run made with `model.decoder_skip=false` shows the MLP decoder alone (measured on the embedded default: 0.715 on
the held-out types, 0.732 on the training types, against 0.79 / 0.76 for ridge).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import torch

PENALTIES = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="results/runs/st_lora")
    parser.add_argument("--data", default="data/wound_healing.h5ad")
    args = parser.parse_args()

    import stlib
    from stlib.adapters.lora import base_model

    path = Path(args.data)
    splits = tomllib.loads((path.parent / "wound_healing.toml").read_text())["zeroshot"]
    held_out = {key.split(".", 1)[1]: value for key, value in splits.items()}
    adata = ad.read_h5ad(path)
    emb = adata.obsm["X_state"].astype(np.float64)
    genes = adata.layers["log1p"]
    obs = adata.obs
    ct, cond, day, mouse = (obs[c].astype(str).to_numpy() for c in ("cell_types_simple_short", "condition", "day",
                                                                     "mouse_id"))
    train_types = sorted(set(ct) - set(held_out))
    type_sets = {"training": train_types,
                 **{split: sorted(c for c, s in held_out.items() if s == split) for split in ("val", "test")}}

    train_rows = np.isin(ct, train_types)
    e, x = emb[train_rows], genes[train_rows].toarray().astype(np.float64)
    e_centred, x_centred = e - e.mean(0), x - x.mean(0)
    gram, cross = e_centred.T @ e_centred, e_centred.T @ x_centred
    slopes = {lam: np.linalg.solve(gram + lam * len(e) * np.eye(e.shape[1]), cross) for lam in PENALTIES}
    decoder = base_model(stlib.load_model(args.run_dir)).gene_decoder
    if decoder is None:
        raise SystemExit(f"{args.run_dir} has no gene decoder (data.output_space=embedding)")
    decoder = decoder.eval()

    def mean(matrix, rows):
        return np.asarray(matrix[rows].mean(0)).ravel()

    def decoded_change(controls: np.ndarray, shift: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            start = torch.from_numpy(controls).float()
            return (decoder(start + torch.from_numpy(shift).float()) - decoder(start)).mean(0).numpy()

    print(f"decoder: {args.run_dir} (linear readout beside its MLP: {getattr(decoder, 'skip', False)}); "
          f"mean Pearson r of the read-out real embedding shift with the real gene shift, over Burn groups")
    print(f"{'cell types':34s} {'groups':>6s} {'decoder':>8s} " + " ".join(f"{'ridge ' + f'{p:g}':>11s}"
                                                                     for p in PENALTIES))
    for split, types in type_sets.items():
        rows = []
        for c in types:
            for m in sorted(set(mouse[(ct == c) & (cond == "Burn")])):
                group = (ct == c) & (cond == "Burn") & (mouse == m)
                controls = (ct == c) & (cond == "Sham") & (day == day[group][0])
                real_x = mean(genes, group) - mean(genes, controls)
                real_e = mean(emb, group) - mean(emb, controls)
                scores = [np.corrcoef(decoded_change(emb[controls], real_e), real_x)[0, 1]]
                scores += [np.corrcoef(real_e @ slopes[p], real_x)[0, 1] for p in PENALTIES]
                rows.append(scores)
        label = f"{split} ({', '.join(types)})"
        print(f"{label[:34]:34s} {len(rows):6d} " + " ".join(f"{v:>{8 if i == 0 else 11}.3f}"
                                                              for i, v in enumerate(np.mean(rows, 0))))


if __name__ == "__main__":
    main()
