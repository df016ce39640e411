"""ridge_solve: exact without a penalty, the same readout as GeneDecoder.fit_skip with one."""

import numpy as np
import torch

from stlib.evaluate.linear import ridge_solve
from stlib.models.state_transition import GeneDecoder


def _normal_equations(e: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.c_[e, np.ones(len(e))]
    return a.T @ a, a.T @ x


def test_recovers_a_linear_map_without_penalty():
    rng = np.random.default_rng(0)
    e, weight, bias = rng.normal(size=(200, 5)), rng.normal(size=(5, 7)), rng.normal(size=7)
    w, b = ridge_solve(*_normal_equations(e, e @ weight + bias), 200, 0.0)
    np.testing.assert_allclose(w, weight, atol=1e-10)
    np.testing.assert_allclose(b, bias, atol=1e-10)


def test_matches_the_gene_decoders_linear_readout():
    rng = np.random.default_rng(1)
    e, x = rng.normal(size=(100, 4)), rng.normal(size=(100, 6))
    gram, cross = _normal_equations(e, x)
    decoder = GeneDecoder(4, 6, [8], 0.0, softplus=False, skip=True).double()
    decoder.fit_skip(torch.from_numpy(gram), torch.from_numpy(cross), 100, 0.05)
    w, b = ridge_solve(gram, cross, 100, 0.05)
    np.testing.assert_allclose(decoder.skip_weight.numpy(), w.T, atol=1e-10)
    np.testing.assert_allclose(decoder.skip_bias.numpy(), b, atol=1e-10)
