"""Shared fixtures: a tiny generated study (source + wound healing) and a tiny model config."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # tests run side by side on 2 cores; tiny models gain nothing from threads

TINY_MODEL = [
    "model.hidden_dim=32", "model.n_layers=2", "model.n_heads=4", "model.intermediate_size=64",
    "model.cell_set_len=8", "model.decoder_hidden=[32]",
]
TINY_TRAINING = [
    "training.batch_size=4", "training.val_every_n_steps=5", "training.ckpt_every_n_steps=5",
    "training.log_every_n_steps=1", "training.warmup_steps=2", "training.progress_bar=false",
]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """Generated data small enough for seconds-long runs: data/{wound_healing,source_perturbations}.{h5ad,toml}."""
    from stlib.data.synthetic import write_default_data

    root = tmp_path_factory.mktemp("study")
    write_default_data(root / "data", n_cells=900, n_genes=150, embed_dim=16, n_source_cells=900, seed=0)
    return root


def tiny_overrides(root: Path, name: str, toml: str, steps: int) -> list[str]:
    return TINY_MODEL + TINY_TRAINING + [
        f"data.toml_config_path={root / 'data' / toml}", f"output_dir={root / 'runs'}", f"name={name}",
        f"training.max_steps={steps}",
    ]


@pytest.fixture(scope="session")
def tiny_base(tiny_study) -> Path:
    """A tiny pretrained base (source domain), shared by every fine-tuning test."""
    from stlib.config import load_config
    from stlib.train.run import train

    overrides = tiny_overrides(tiny_study, "base", "source_perturbations.toml", 30) + ["training.lr=3e-3"]
    return train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides)


@pytest.fixture(scope="session")
def velocity_data(tiny_study) -> Path:
    """The tiny wound data with scvelo velocity in the model's space (what `stlib velocity` writes)."""
    from stlib.data.velocity import run_velocity

    path = tiny_study / "data" / "wound_healing.h5ad"
    run_velocity(path, embed_key="X_state", out_path=path)
    return tiny_study
