"""Writing AnnData files that every anndata version reads, whatever pandas made of the strings.

pandas >= 3 stores every string column and index in its new string dtype, and anndata refuses to write those
(``allow_write_nullable_strings``: files that anndata < 0.11 cannot read). stlib writes plain object strings.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd


def _is_new_string(dtype) -> bool:
    return isinstance(dtype, pd.StringDtype)


def _plain_strings(frame: pd.DataFrame) -> None:
    """In place: string-dtype index, columns and categories -> object (values unchanged)."""
    if _is_new_string(frame.index.dtype):
        frame.index = frame.index.astype(object)
    for name in frame.columns:
        column = frame[name]
        if _is_new_string(column.dtype):
            frame[name] = column.astype(object)
        elif isinstance(column.dtype, pd.CategoricalDtype) and _is_new_string(column.cat.categories.dtype):
            frame[name] = column.cat.set_categories(column.cat.categories.astype(object))


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """``adata.write_h5ad(path)`` with pandas' string dtype turned into object strings first (in place)."""
    _plain_strings(adata.obs)
    _plain_strings(adata.var)
    adata.write_h5ad(path)
