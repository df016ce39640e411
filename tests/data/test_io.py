"""AnnData files stlib writes are readable whatever pandas made of the strings (pandas >= 3: its string dtype)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stlib.data.io import write_h5ad


def _adata() -> ad.AnnData:
    obs = pd.DataFrame({"condition": ["Sham", "Burn", "Burn"], "mouse": pd.Categorical(["M1", "M2", "M1"]),
                        "day": [10, 14, 19]}, index=[f"cell{i}" for i in range(3)])
    var = pd.DataFrame({"symbol": ["A", "B"]}, index=["g1", "g2"])
    return ad.AnnData(X=np.arange(6, dtype=np.float32).reshape(3, 2), obs=obs, var=var)


def test_new_pandas_strings_are_written_as_plain_strings(tmp_path):
    with pd.option_context("future.infer_string", True):  # what pandas >= 3 does by default
        adata = _adata()
        assert isinstance(adata.obs["condition"].dtype, pd.StringDtype)
        with pytest.raises(RuntimeError, match="allow_write_nullable_strings"):
            adata.copy().write_h5ad(tmp_path / "plain.h5ad")  # anndata alone refuses
        write_h5ad(adata, tmp_path / "stlib.h5ad")
    back = ad.read_h5ad(tmp_path / "stlib.h5ad")
    assert list(back.obs["condition"]) == ["Sham", "Burn", "Burn"]
    assert list(back.obs["mouse"]) == ["M1", "M2", "M1"] and list(back.obs_names) == ["cell0", "cell1", "cell2"]
    assert list(back.var["symbol"]) == ["A", "B"] and list(back.var_names) == ["g1", "g2"]
    assert list(back.obs["day"]) == [10, 14, 19]
