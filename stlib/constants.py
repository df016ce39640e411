"""Names shared across stlib: AnnData keys, variant names and the files of a run dir.

One home for every string two modules must agree on (as scvi-tools' ``REGISTRY_KEYS``), so a key is
renamed in one place and a reader never guesses what a writer called it.
"""

from __future__ import annotations

# --- AnnData keys written by stlib
VELOCITY_CONFIDENCE_KEY = "velocity_confidence"  # obs: how much scvelo trusts a cell's velocity, in [0, 1]
VELOCITY_UNS_KEY = "stlib_velocity"  # uns: how `stlib velocity` computed the cached velocity
PREDICTION_UNS_KEY = "stlib"  # uns of prediction files: the column names evaluation needs
GROUP_KEY = "group_id"  # obs: same id for a predicted group and its real counterpart
SOURCE_INDEX_KEY = "source_index"  # obs: row in the original AnnData
BASAL_INDEX_KEY = "basal_index"  # obs (pred): original row of the control cell a prediction was made from


def velocity_key(embed_key: str) -> str:
    """obsm key of RNA velocity expressed in the space `embed_key` names."""
    return f"velocity_{embed_key}"


# --- the study's variants, in the order tables and figures show them
VARIANTS = ("baseline", "st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity")

# --- files of a run dir ({output_dir}/{name}/), laid out as `state tx train` lays out its own
CONFIG_FILE = "config.yaml"
DIMS_FILE = "model_dims.json"
PERT_MAP_FILE = "pert_onehot_map.pt"
CELL_TYPE_MAP_FILE = "cell_type_onehot_map.torch"
BATCH_MAP_FILE = "batch_onehot_map.torch"
CHECKPOINT_DIR = "checkpoints"
FINAL_CHECKPOINT = "final.ckpt"
LAST_CHECKPOINT = "last.ckpt"
ADAPTER_FILE = "adapter.pt"
TRAINABLE_PARAMS_FILE = "trainable_params.json"
RUN_SUMMARY_FILE = "run_summary.json"
TENSORBOARD_DIR = "tensorboard"
BASE_FILE = "base.json"  # a lean fine-tune's base: path, checkpoint and content hash
LEAN_KEY = "stlib_lean"  # set in a checkpoint that holds only what trained (its base is named in base.json)
STANDALONE_KEY = "stlib"  # in an exported checkpoint: the config, sizes and maps needed to rebuild it

# Jupyter kernel `make setup` registers in the venv; both notebooks name it (papermill: -k stlib)
KERNEL_NAME = "stlib"
