"""ridge_solve is exact without a penalty; normal_equations summed in chunks equal a single pass."""

import numpy as np

from stlib.linear import normal_equations, ridge_solve


def _normal_equations(e: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.c_[e, np.ones(len(e))]
    return a.T @ a, a.T @ x


def test_recovers_a_linear_map_without_penalty():
    rng = np.random.default_rng(0)
    e, weight, bias = rng.normal(size=(200, 5)), rng.normal(size=(5, 7)), rng.normal(size=7)
    w, b = ridge_solve(*_normal_equations(e, e @ weight + bias), 200, 0.0)
    np.testing.assert_allclose(w, weight, atol=1e-10)
    np.testing.assert_allclose(b, bias, atol=1e-10)


def test_normal_equations_summed_in_chunks_equal_one_pass():
    rng = np.random.default_rng(1)
    e, x = rng.normal(size=(100, 4)), rng.normal(size=(100, 6))
    gram, cross = _normal_equations(e, x)
    chunks = ((e[i:i + 30], x[i:i + 30]) for i in range(0, 100, 30))  # uneven last chunk
    got_gram, got_cross, n = normal_equations(chunks)
    assert n == 100
    np.testing.assert_allclose(got_gram, gram, atol=1e-10)
    np.testing.assert_allclose(got_cross, cross, atol=1e-10)
