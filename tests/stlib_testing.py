"""Constants and helpers shared by the tests (a plain module: conftest names collide across folders)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (CI clones main next to it); a real `state tx train` run dir made by arc-state
STATE_FIXTURE = next((p for p in (REPO.parent / "shared" / "fixtures" / "state_st_tiny",
                                  Path("/work/shared/fixtures/state_st_tiny")) if p.is_dir()),
                     REPO.parent / "shared" / "fixtures" / "state_st_tiny")

TINY_MODEL = [
    "model.hidden_dim=32", "model.n_layers=2", "model.n_heads=4", "model.intermediate_size=64",
    "model.cell_set_len=8", "model.decoder_hidden=[32]",
]
TINY_TRAINING = [
    "training.batch_size=4", "training.val_every_n_steps=5", "training.ckpt_every_n_steps=5",
    "training.log_every_n_steps=1", "training.warmup_steps=2", "training.progress_bar=false",
]


def tiny_overrides(root: Path, name: str, toml: str, steps: int) -> list[str]:
    """A seconds-long run of `name` on the tiny study's `toml` into root/runs."""
    return TINY_MODEL + TINY_TRAINING + [
        f"data.toml_config_path={root / 'data' / toml}", f"output_dir={root / 'runs'}", f"name={name}",
        f"training.max_steps={steps}",
    ]
