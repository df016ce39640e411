"""Predictions run on the device asked for, in batches, and several models share one read of their data."""

import anndata as ad
import numpy as np
import pytest
import torch

from stlib.data.datamodule import PerturbationDataModule
from stlib.errors import ConfigError
from stlib.evaluate.predict import predict_run, resolve_device


def test_device_names_resolve_or_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU here"):
            resolve_device("cuda")


@pytest.mark.slow
def test_a_shared_cache_reads_the_data_once_and_changes_no_prediction(tiny_base, tmp_path, monkeypatch):
    setups = []
    original = PerturbationDataModule.setup
    monkeypatch.setattr(PerturbationDataModule, "setup", lambda self, stage=None: (setups.append(stage),
                                                                                   original(self, stage))[1])
    alone, _ = predict_run(tiny_base, split="val", out_dir=tmp_path / "alone", batch_size=3)
    cache: dict = {}
    first, _ = predict_run(tiny_base, split="val", out_dir=tmp_path / "a", data_cache=cache, name="a")
    second, _ = predict_run(tiny_base, split="val", out_dir=tmp_path / "b", data_cache=cache, name="b")
    assert len(setups) == 2  # one for the run without the cache, one for both runs sharing it
    x = [ad.read_h5ad(p).X for p in (alone, first, second)]
    np.testing.assert_allclose(x[1], x[2])
    np.testing.assert_allclose(x[0], x[1], rtol=1e-5, atol=1e-6)  # the batch size does not change predictions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictions_on_the_gpu_match_the_cpu(tiny_base, tmp_path):
    cpu, _ = predict_run(tiny_base, split="val", out_dir=tmp_path / "cpu", device="cpu")
    gpu, _ = predict_run(tiny_base, split="val", out_dir=tmp_path / "gpu", device="cuda")
    np.testing.assert_allclose(ad.read_h5ad(cpu).X, ad.read_h5ad(gpu).X, rtol=1e-3, atol=1e-4)
