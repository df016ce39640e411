"""Both notebooks end to end under papermill (train every variant's script, then compare), and their parameters."""

import json

import pandas as pd
import pytest
from PIL import Image
from stlib_testing import REPO, TINY_TRAINING


@pytest.mark.slow
def test_both_notebooks_run_under_papermill(velocity_data, tiny_base, tmp_path):
    import papermill as pm

    study = velocity_data
    runs, results = tmp_path / "runs", tmp_path / "results"
    # the untrained baseline (no TensorBoard events) and the variant with every part (LoRA, mHC, velocity): each code
    # path of both notebooks; plain st_lora's script and run are tested in test_workflow.py and tests/train/
    variants = ["baseline", "st_lora_mhc_velocity"]
    # unseen cell types trains both; unseen mice only the (untrained) baseline: the compare notebook's two settings
    for setting, toml, trained in (("unseen_cell_type", "wound_healing.toml", variants),
                                   ("unseen_mouse", "wound_healing_mice.toml", ["baseline"])):
        pm.execute_notebook(
            str(REPO / "notebooks" / "train_all_variants.ipynb"), str(tmp_path / f"train_{setting}.ipynb"),
            kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False,
            parameters={"data_toml": str(study / "data" / toml), "base_checkpoint": str(tiny_base),
                        "variants": trained, "max_steps": 4, "output_root": str(runs / setting),
                        "scripts_dir": str(tmp_path / "ts" / setting), "logs_dir": str(tmp_path / "logs" / setting),
                        "extra_overrides": ["model.cell_set_len=8", "model.velocity_warmup_steps=2", *TINY_TRAINING]},
        )
        for variant in trained:
            assert (runs / setting / variant / "checkpoints" / "final.ckpt").exists(), variant
            assert (tmp_path / "logs" / setting / f"{variant}_training.log").stat().st_size > 0
    pm.execute_notebook(
        str(REPO / "notebooks" / "compare_results.ipynb"), str(tmp_path / "compare_executed.ipynb"),
        kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False,
        parameters={"variants": variants, "runs_root": str(runs), "results_dir": str(results),
                    "predictions_dir": str(results / "predictions")},
    )
    for png in ("loss_curves_comparison_unseen_cell_type.png", "grad_norm_comparison_unseen_cell_type.png",
                "umap_comparison_all_models_unseen_cell_type.png", "umap_comparison_all_models_unseen_mouse.png",
                "metrics_heatmap.png", "metrics_intervals.png"):
        with Image.open(results / png) as image:
            assert image.size[0] > 200 and image.size[1] > 100, png
    summary = pd.read_csv(results / "metrics_summary.csv")
    models = summary.groupby("setting")["model"].apply(set)
    assert set(variants) | {"control_mean", "mean_shift", "additive_linear"} <= models["unseen_cell_type"]
    assert {"baseline", "celltype_time_shift", "additive_linear"} <= models["unseen_mouse"]  # cell types were seen
    assert "celltype_time_shift" not in models["unseen_cell_type"]  # held-out cell types have no training shift
    assert summary[["gene_correlation", "gene_correlation_lo", "gene_correlation_hi"]].notna().all().all()
    versus = pd.read_csv(results / "metrics_vs_baselines.csv")
    assert set(versus["model"]) == set(variants) and (versus["better_by_lo"] <= versus["better_by_hi"]).all()
    assert len(pd.read_csv(results / "training_dynamics_unseen_cell_type.csv")) == len(variants)
    executed = json.loads((tmp_path / "compare_executed.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # the figures are shown in the notebook, not only saved


@pytest.mark.parametrize("notebook", ["train_all_variants.ipynb", "compare_results.ipynb"])
def test_papermill_sees_every_notebook_parameter(notebook):
    """`papermill --help-notebook` lists each parameter; a line it cannot parse (e.g. a second '=' in a comment)
    silently drops that parameter from the help and warns on every run."""
    import ast

    import nbformat
    import papermill

    nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert assigned, "the parameters cell assigns nothing"
    assert set(papermill.inspect_notebook(str(REPO / "notebooks" / notebook))) == assigned
