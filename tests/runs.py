"""Trained runs shared by the whole session: each is trained once and read by every test that needs it.

tests/conftest.py re-exports these fixtures. A test that only *reads* a run (its files, checkpoints, TensorBoard
events, predictions, load_any) takes it from here; a test that needs a run of its own (a crash, a callback, a config
no other test uses, or one that edits the run dir) trains it itself, with the fewest steps its check needs.
Runs live under the session's tiny study (tiny_study/runs/<name>); names here are not used by any test's own run.
"""

from pathlib import Path

import pytest
from stlib_testing import REPO, TINY_TRAINING, tiny_overrides

from stlib.constants import (
    KERNEL_NAME,
    VARIANTS,  # noqa: F401  (re-exported for the tests)
)

WOUND_DATA = ["data.pert_col=condition", "data.control_pert=Sham", "data.cell_type_key=cell_types_simple_short",
              "data.batch_col=mouse_id", "data.time_col=day"]


def finetune_cfg(root: Path, base: Path, variant: str, steps: int = 6, extra=()):
    """configs/variants/<variant>.yaml fine-tuned from base on the tiny wound data: (cfg, overrides)."""
    from stlib.config import load_config

    steps = 0 if variant == "baseline" else steps  # the baseline is the base, not trained
    overrides = tiny_overrides(root, variant, "wound_healing.toml", steps) + [
        f"model.init_from={base}", "model.velocity_warmup_steps=2", *extra]
    return load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides


@pytest.fixture(scope="session")
def finetuned(velocity_data, tiny_base):
    """finetuned(variant) -> run dir: the variant fine-tuned from tiny_base for 6 steps, trained on first use."""
    from stlib.train.run import train

    runs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            cfg, overrides = finetune_cfg(velocity_data, tiny_base, variant)
            runs[variant] = train(cfg, overrides)
        return runs[variant]

    return get


@pytest.fixture(scope="session")
def gene_base(tiny_study) -> Path:
    """A base pretrained with a gene decoder (data.output_space=all) on the wound data, as State's ST-Tahoe has one."""
    from stlib.config import load_config
    from stlib.train.run import train

    overrides = tiny_overrides(tiny_study, "shared_gene_base", "wound_healing.toml", 4) + [
        "data.output_space=all", *WOUND_DATA]
    return train(load_config(REPO / "configs" / "pretrain.yaml", overrides), overrides)


@pytest.fixture(scope="session")
def executed_notebooks(velocity_data, tiny_base, tmp_path_factory):
    """Both notebooks run under papermill on the tiny study, in both settings, plus the HTML report: the paths.

    Shared with the browser test (tests/test_browser.py), which opens these executed notebooks in JupyterLab."""
    import papermill as pm

    from stlib.notebook import export_html

    study, tmp_path = velocity_data, tmp_path_factory.mktemp("notebooks")
    runs, results = tmp_path / "runs", tmp_path / "results"
    # the untrained baseline (no TensorBoard events) and the variant with every part (LoRA, mHC, velocity): each code
    # path of both notebooks; plain st_lora's script and run are tested in test_workflow.py and tests/train/
    variants = ["baseline", "st_lora_mhc_velocity"]
    # unseen cell types trains both; unseen mice only the (untrained) baseline: the compare notebook's two settings
    for setting, toml, trained in (("unseen_cell_type", "wound_healing.toml", variants),
                                   ("unseen_mouse", "wound_healing_mice.toml", ["baseline"])):
        pm.execute_notebook(
            str(REPO / "notebooks" / "train_all_variants.ipynb"), str(tmp_path / f"train_{setting}.ipynb"),
            kernel_name=KERNEL_NAME, cwd=str(REPO / "notebooks"), progress_bar=False,
            parameters={"data_toml": str(study / "data" / toml), "base_checkpoint": str(tiny_base),
                        "variants": trained, "max_steps": 4, "output_root": str(runs / setting),
                        "scripts_dir": str(tmp_path / "ts" / setting), "logs_dir": str(tmp_path / "logs" / setting),
                        "extra_overrides": ["model.cell_set_len=8", "model.velocity_warmup_steps=2", *TINY_TRAINING]},
        )
    pm.execute_notebook(
        str(REPO / "notebooks" / "compare_results.ipynb"), str(tmp_path / "compare_results.ipynb"),
        kernel_name=KERNEL_NAME, cwd=str(REPO / "notebooks"), progress_bar=False,
        parameters={"variants": variants, "runs_root": str(runs), "results_dir": str(results),
                    "predictions_dir": str(results / "predictions")},
    )
    export_html(tmp_path / "compare_results.ipynb", results / "compare_results.html")
    return {"root": tmp_path, "runs": runs, "results": results, "variants": variants,
            "train": tmp_path / "train_unseen_cell_type.ipynb", "compare": tmp_path / "compare_results.ipynb",
            "html": results / "compare_results.html"}
