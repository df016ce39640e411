"""How faithfully does a gene readout turn a *known* embedding shift into genes? (embedding -> log1p genes)

Every Burn group's real shift is known in both spaces (see study.py). This reads the real *embedding* shift out
into genes and prints the mean Pearson r with the real *gene* shift, per split of cell types:
  * through a run's gene decoder, as `stlib predict` does (mean over the controls c of dec(c + shift) - dec(c));
  * through ridge readouts of expression from the embedding, fitted on the training cells as a new gene
    decoder's linear readout is, for several penalties per cell (`model.decoder_skip_ridge`).
A readout that loses here loses for every model: no prediction can score better than the real shift does.

    .venv/bin/python analysis/readout_fidelity.py [--run-dir results/runs/st_lora] [--data data/wound_healing.h5ad]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from study import DATA, group_shift, load_study, perturbed_groups

from stlib.evaluate.layout import rows
from stlib.evaluate.metrics import pearson
from stlib.linear import normal_equations, ridge_solve

PENALTIES = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="results/runs/st_lora")
    parser.add_argument("--data", default=str(DATA), help="the wound data; its split TOML beside it")
    args = parser.parse_args()

    import stlib
    from stlib.adapters.lora import base_model

    decoder = base_model(stlib.load_model(args.run_dir)).gene_decoder
    if decoder is None:
        raise SystemExit(f"{args.run_dir} has no gene decoder (data.output_space=embedding)")
    decoder = decoder.eval()
    dm = load_study(args.data)
    emb, genes = dm.store.embed, dm.store.genes
    equations = normal_equations(dm.train_cell_chunks())
    slopes = {p: ridge_solve(*equations, p)[0] for p in PENALTIES}

    @torch.no_grad()
    def decoded_change(controls: np.ndarray, shift: np.ndarray) -> np.ndarray:
        start = torch.from_numpy(controls).float()
        return (decoder(start + torch.from_numpy(shift).float()) - decoder(start)).mean(0).double().numpy()

    print(f"decoder: {args.run_dir} (linear readout beside its MLP: {getattr(decoder, 'skip', False)}); "
          f"mean Pearson r of the read-out real embedding shift with the real gene shift, over Burn groups")
    print(f"{'cell types':34s} {'groups':>6s} {'decoder':>8s} " + " ".join(f"{'ridge ' + f'{p:g}':>11s}"
                                                                     for p in PENALTIES))
    for split, label in (("train", "training"), ("val", "val"), ("test", "test")):
        scores = []
        for g in perturbed_groups(dm, split):
            real_x, real_e = group_shift(genes, g), group_shift(emb, g)
            scores.append([pearson(decoded_change(rows(emb, g.basal_indices), real_e), real_x)]
                          + [pearson(real_e @ slopes[p], real_x) for p in PENALTIES])
        types = f"{label} ({', '.join(sorted({g.cell_type for g in perturbed_groups(dm, split)}))})"
        print(f"{types[:34]:34s} {len(scores):6d} " + " ".join(f"{v:>{8 if i == 0 else 11}.3f}"
                                                               for i, v in enumerate(np.mean(scores, 0))))


if __name__ == "__main__":
    main()
