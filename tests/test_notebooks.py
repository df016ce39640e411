"""Both notebooks end to end under papermill (train every variant's script, then compare), and their parameters."""

import json

import pandas as pd
import pytest
from PIL import Image
from stlib_testing import REPO


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")  # with -n: the browser test reads the same executed notebooks
def test_both_notebooks_run_under_papermill(executed_notebooks):
    runs, results, variants = (executed_notebooks[k] for k in ("runs", "results", "variants"))
    tmp_path = executed_notebooks["root"]
    for setting, trained in (("unseen_cell_type", variants), ("unseen_mouse", ["baseline"])):
        for variant in trained:
            assert (runs / setting / variant / "checkpoints" / "final.ckpt").exists(), variant
            assert (tmp_path / "logs" / setting / f"{variant}_training.log").stat().st_size > 0
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
    executed = json.loads(executed_notebooks["compare"].read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # the figures are shown in the notebook, not only saved
    assert not [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    html = executed_notebooks["html"].read_text()
    assert html.count("data:image/png;base64") >= 5 and "Traceback" not in html  # figures embedded, no errors
    assert "notebook.evaluate_study" not in html  # code hidden: a report, not a program


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


def test_a_notebook_run_logs_no_kernel_chatter(tmp_path):
    """papermill on the project's kernel: a run's log holds the notebook's output, not ipykernel's warnings."""
    import subprocess
    import sys

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nbformat.write(new_notebook(cells=[new_code_cell("print('hello from stlib')")]), tmp_path / "in.ipynb")
    done = subprocess.run([sys.executable, "-m", "papermill", "-k", "stlib", "--log-output", "--no-progress-bar",
                           str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb")], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hello from stlib" in done.stdout + done.stderr
    assert "without encryption" not in done.stdout + done.stderr
