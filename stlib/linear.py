"""Ridge regression from normal equations: the one linear readout of expression from an embedding.

:func:`normal_equations` sums the normal equations of [E 1] (embedding plus a constant column) against
expression X chunk by chunk (``PerturbationDataModule.train_cell_chunks`` gives the training cells), so a large
study's expression is never dense at once; :func:`ridge_solve` turns them into a readout. The penalty is per cell
(``penalty_per_cell * n_cells`` on the weights, none on the bias), so one value suits any number of cells, as
``decoder.skip_ridge`` does. Used by the gene decoder's linear readout and by analysis/.
"""

from __future__ import annotations

import numpy as np


def normal_equations(chunks) -> tuple[np.ndarray, np.ndarray, int]:
    """([E 1]^T [E 1] [D+1, D+1], [E 1]^T X [D+1, G], n) in float64 from chunks of (E [n, D], X [n, G])."""
    gram = cross = None
    n = 0
    for emb, genes in chunks:
        e = np.c_[np.asarray(emb, dtype=np.float64), np.ones(len(emb))]
        x = np.asarray(genes, dtype=np.float64)
        gram = e.T @ e if gram is None else gram + e.T @ e
        cross = e.T @ x if cross is None else cross + e.T @ x
        n += len(emb)
    if gram is None:
        raise ValueError("normal_equations: no cells")
    return gram, cross, n


def ridge_solve(gram: np.ndarray, cross: np.ndarray, n_cells: int, penalty_per_cell: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Ridge of X on E from ``gram`` = [E 1]^T [E 1] ([D+1, D+1]) and ``cross`` = [E 1]^T X ([D+1, G]).

    Returns (weight [D, G], bias [G]), float64, so that X ≈ E @ weight + bias.
    """
    gram, cross = np.asarray(gram, dtype=np.float64), np.asarray(cross, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or cross.ndim != 2 or cross.shape[0] != gram.shape[0]:
        raise ValueError(f"expected gram [D+1, D+1] and cross [D+1, G], got {gram.shape} and {cross.shape}")
    if penalty_per_cell < 0:
        raise ValueError(f"penalty_per_cell must be >= 0, got {penalty_per_cell}")
    penalty = np.full(gram.shape[0], penalty_per_cell * n_cells)
    penalty[-1] = 0.0  # the bias (constant column) is not shrunk
    solution = np.linalg.solve(gram + np.diag(penalty), cross)
    return solution[:-1], solution[-1]
