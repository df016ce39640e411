"""The user paths: generated bash scripts (run through tee), a failing variant, both notebooks via papermill."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from stlib_testing import REPO, TINY_TRAINING

from stlib.config import ConfigError
from stlib.train_scripts import parallel_commands, plan_scripts, run_scripts, status_table, tensorboard_command


def _overrides(study: Path, base: Path, steps: int = 4) -> list[str]:
    return [f"data.toml_config_path={study / 'data' / 'wound_healing.toml'}", f"model.init_from={base}",
            f"output_dir={study / 'wf_runs'}", f"training.max_steps={steps}", "model.cell_set_len=8",
            *TINY_TRAINING]


def test_scripts_are_exact_commands_runnable_with_tee(tiny_study, tiny_base, tmp_path):
    specs = plan_scripts(["baseline", "st_lora"], out_dir=tmp_path / "train_scripts", root=REPO,
                         overrides=_overrides(tiny_study, tiny_base), log_dir=tmp_path / "logs")
    text = specs[1].path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "train --config configs/variants/st_lora.yaml" in text and "training.max_steps=4" in text
    assert "training.max_steps" not in specs[0].path.read_text()  # the baseline is never trained
    log = tmp_path / "logs" / "st_lora_training.log"
    log.parent.mkdir()
    done = subprocess.run(["bash", "-c", f"set -o pipefail; bash {specs[1].path} 2>&1 | tee {log}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "[stlib] done: 4 steps" in log.read_text()
    assert (specs[1].run_dir / "checkpoints" / "final.ckpt").exists()
    assert parallel_commands(specs, gpus=[0, 1])[1].startswith("CUDA_VISIBLE_DEVICES=1 bash ")
    assert tensorboard_command(specs) == f"tensorboard --logdir {tiny_study / 'wf_runs'}"


def test_a_bad_override_fails_before_any_script_is_written(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `training.max_steps`"):
        plan_scripts(["st_lora"], out_dir=tmp_path, root=REPO, overrides=["training.max_step=3"])
    assert not list(tmp_path.iterdir())


def test_a_failing_variant_is_reported_and_the_others_still_run(tiny_study, tiny_base, tmp_path):
    runs = tiny_study / "wf_fail_runs"
    overrides = _overrides(tiny_study, tiny_base) + [f"output_dir={runs}"]
    good = plan_scripts(["baseline", "st_lora"], out_dir=tmp_path / "s", root=REPO, overrides=overrides,
                        log_dir=tmp_path / "logs")
    (runs / "st_lora" / "notes.txt").parent.mkdir(parents=True)
    (runs / "st_lora" / "notes.txt").write_text("keep me")
    bad = plan_scripts(["st_lora_mhc"], out_dir=tmp_path / "s", root=REPO, log_dir=tmp_path / "logs",
                       overrides=overrides + ["data.pert_col=treatment"])
    with open(tmp_path / "out.txt", "w") as out:
        status = run_scripts([good[0], bad[0], good[1]], root=REPO, stream=out)
    by_variant = status.set_index("variant")
    assert by_variant.loc["st_lora_mhc", "status"] == "failed"
    assert "data.pert_col" in by_variant.loc["st_lora_mhc", "error"]
    assert by_variant.loc["st_lora", "status"] == "completed" and by_variant.loc["baseline", "status"] == "completed"
    assert (runs / "st_lora" / "notes.txt").read_text() == "keep me"
    # run again: finished variants are skipped, nothing retrained
    with open(tmp_path / "out2.txt", "w") as out:
        again = run_scripts(good, root=REPO, stream=out)
    assert set(again.status) == {"skipped (done)"}
    assert set(status_table(good, root=REPO).status) == {"completed"}
    # overwrite moves the old run aside instead of deleting it
    with open(tmp_path / "out3.txt", "w") as out:
        run_scripts(good[1:], root=REPO, overwrite=True, stream=out)
    moved = [p for p in runs.iterdir() if p.name.startswith("st_lora.old-")]
    assert moved and (moved[0] / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_both_notebooks_run_under_papermill(velocity_data, tiny_base, tmp_path):
    import papermill as pm

    study = velocity_data
    runs, results = tmp_path / "runs", tmp_path / "results"
    variants = ["baseline", "st_lora", "st_lora_mhc_velocity"]
    pm.execute_notebook(
        str(REPO / "notebooks" / "train_all_variants.ipynb"), str(tmp_path / "train_executed.ipynb"),
        kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False,
        parameters={"data_toml": str(study / "data" / "wound_healing.toml"), "base_checkpoint": str(tiny_base),
                    "variants": variants, "max_steps": 4, "output_root": str(runs), "scripts_dir": str(tmp_path / "ts"),
                    "logs_dir": str(tmp_path / "logs"),
                    "extra_overrides": ["model.cell_set_len=8", "model.velocity_warmup_steps=2", *TINY_TRAINING]},
    )
    for variant in variants:
        assert (runs / variant / "checkpoints" / "final.ckpt").exists(), variant
        assert (tmp_path / "logs" / f"{variant}_training.log").stat().st_size > 0
    pm.execute_notebook(
        str(REPO / "notebooks" / "compare_results.ipynb"), str(tmp_path / "compare_executed.ipynb"),
        kernel_name="python3", cwd=str(REPO / "notebooks"), progress_bar=False,
        parameters={"variants": variants, "runs_root": str(runs), "results_dir": str(results),
                    "predictions_dir": str(results / "predictions")},
    )
    for png in ("loss_curves_comparison.png", "grad_norm_comparison.png", "umap_comparison_all_models.png",
                "metrics_heatmap.png"):
        with Image.open(results / png) as image:
            assert image.size[0] > 200 and image.size[1] > 100, png
    summary = pd.read_csv(results / "metrics_summary.csv")
    assert set(variants + ["control_mean", "mean_shift"]) <= set(summary.model)
    assert summary[["gene_correlation", "direction_cosine"]].notna().all().all()
    assert len(pd.read_csv(results / "training_dynamics.csv")) == len(variants)
    executed = json.loads((tmp_path / "compare_executed.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the figures are shown in the notebook, not only saved


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
