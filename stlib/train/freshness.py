"""Whether a finished run is older than what it was made from: the data files its split TOML names and its base.

Why: `make demo` and the training notebook skip a variant whose `final.ckpt` exists. After the data are remade
or the base is retrained, such a run was trained on inputs that no longer exist, and a study would silently
mix it with fresh ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from stlib.constants import BASE_FILE, CHECKPOINT_DIR, CONFIG_FILE, FINAL_CHECKPOINT


def run_inputs(run_dir: str | Path, root: str | Path = ".") -> list[Path]:
    """The files a run was trained from: its datasets' .h5ad files and its base checkpoint (where named)."""
    from stlib.config import load_config
    from stlib.data.splits import load_split_config
    from stlib.errors import StlibError
    from stlib.models.checkpoints import find_checkpoint, split_model_path

    run_dir, root = Path(run_dir), Path(root)
    inputs: list[Path] = []
    try:
        cfg = load_config(run_dir / CONFIG_FILE)
        toml = Path(cfg.data.toml_config_path or "")
        toml = toml if toml.is_absolute() else root / toml
        if toml.is_file():
            split = load_split_config(toml)
            inputs += [f for name in split.datasets for f in split.files(name)]
        base = run_dir / BASE_FILE
        if base.is_file():  # a lean fine-tune names its base's checkpoint
            inputs.append(Path(json.loads(base.read_text())["checkpoint"]))
        elif cfg.model.init_from:  # a full fine-tune: the checkpoint its base resolves to, as the loader finds it
            start = Path(cfg.model.init_from)
            inputs.append(find_checkpoint(*split_model_path(start if start.is_absolute() else root / start)))
    except (OSError, KeyError, StlibError, ValueError):
        pass  # a run dir stlib cannot read is judged by its checkpoint alone
    return inputs


def newer_inputs(run_dir: str | Path, root: str | Path = ".") -> list[Path]:
    """Inputs changed after the run's final.ckpt was written ([] when it is up to date or has not finished)."""
    final = Path(run_dir) / CHECKPOINT_DIR / FINAL_CHECKPOINT
    if not final.is_file():
        return []
    written = final.stat().st_mtime
    return [p for p in run_inputs(run_dir, root) if p.exists() and p.stat().st_mtime > written]
