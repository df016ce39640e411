"""Where a model's weights are: a run dir (ours or State's) or a ``.ckpt`` inside one, and how to read them.

One lookup for both layouts: both keep Lightning checkpoints under ``checkpoints/`` and prefer
``final.ckpt``, then ``last.ckpt``, then the newest ``*.ckpt``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from stlib.constants import CHECKPOINT_DIR, FINAL_CHECKPOINT, LAST_CHECKPOINT
from stlib.errors import ModelLoadError

CHECKPOINT_ORDER = (FINAL_CHECKPOINT, LAST_CHECKPOINT)


def split_model_path(path: str | Path, checkpoint: str | None = None) -> tuple[Path, str | None]:
    """A run dir or a .ckpt path -> (run dir, checkpoint name or path, or None for the default)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ModelLoadError(f"{path} is neither a run dir nor a .ckpt file")
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return run_dir, str(path)
    return path, checkpoint


def find_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file to load: `checkpoint` (a path, or a name in checkpoints/), else the preferred one."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if checkpoint:
        for candidate in (Path(checkpoint), ckpt_dir / checkpoint, Path(run_dir) / checkpoint):
            if candidate.is_file():
                return candidate
        have = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
        raise ModelLoadError(f"checkpoint {checkpoint!r} not found in {ckpt_dir}; available: {have}")
    for name in CHECKPOINT_ORDER:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    ckpts = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise ModelLoadError(f"no checkpoint in {ckpt_dir} (expected {' or '.join(CHECKPOINT_ORDER)})")
    return ckpts[-1]


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint as a dict, read without executing code from the file (weights_only), memory-mapped
    so a large base is paged in as its tensors are used rather than copied up front."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise ModelLoadError(f"cannot read {path} as a weights-only checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelLoadError(f"{path} has no 'state_dict' (expected a Lightning checkpoint)")
    return ckpt


def lightning_state_dict(ckpt: dict, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's tensors from a checkpoint our LightningModule wrote (keys under `prefix`, prefix removed)."""
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_lightning_state_dict(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return lightning_state_dict(read_checkpoint(path), prefix)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: names a base checkpoint by content, so a moved or changed base is noticed."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
