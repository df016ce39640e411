"""Ridge regression from normal equations: the one linear readout of expression from an embedding.

``PerturbationDataModule.train_normal_equations`` sums the normal equations of [E 1] (embedding plus a constant
column) against expression X over the training cells, in chunks; :func:`ridge_solve` turns them into a readout.
The penalty is per cell (``penalty_per_cell * n_cells`` on the weights, none on the bias), so one value suits
any number of cells, as ``model.decoder_skip_ridge`` does.
"""

from __future__ import annotations

import numpy as np


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
