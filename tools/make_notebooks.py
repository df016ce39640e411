"""Writes both notebooks (python tools/make_notebooks.py): they are generated, so edit here, not in the .ipynb."""
from pathlib import Path

import nbformat as nbf
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def nb(cells):
    n = new_notebook(cells=cells)
    # the project's kernel (make setup registers it in the venv): the notebook opens on the venv's interpreter
    n.metadata["kernelspec"] = {"name": "stlib", "display_name": "Python (stlib)", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(n.cells):  # stable ids: regenerating changes only what was edited
        cell.id = f"cell-{i:02d}"
    return n

def params(src):
    c = new_code_cell(src); c.metadata["tags"] = ["parameters"]; return c

train = nb([
    new_markdown_cell("""# Train all variants

Writes one script per variant to `train_scripts/train_<variant>.sh`, then (with `run_mode = "sequential"`) runs
them one after another, each through `tee` into `logs/<variant>_training.log`, and shows a status table.
With `run_mode = "scripts_only"` it only writes the scripts and prints the commands (for several GPUs, SLURM,
or a terminal). Training happens in the scripts, not in this kernel; all logic lives in `stlib`.

Each variant's log streams into the cell as it trains (a line every 5 % of the run). **Interrupt the kernel** to
stop: the running variant finishes its step, writes `last.ckpt` and is marked `interrupted`; run the cell again to
resume it where it stopped. Set `show_tensorboard = True` to watch the runs in TensorBoard below.

Batch run: `papermill notebooks/train_all_variants.ipynb results/executed/train_all_variants.ipynb -k stlib -p max_steps 300`"""),
    params("""# Parameters (papermill: -p name value). None keeps the value in configs/.
data_toml = "data/wound_healing.toml"    # State-style TOML naming your .h5ad
base_checkpoint = "results/runs/base"    # stlib run dir, State run dir (e.g. ST-Tahoe) or .ckpt
variants = ["baseline", "st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity"]
max_steps = 300
batch_size = 8
lr = None                                # None: the config's (5e-3 for the CPU demo; the study plan used 5e-5 for 10k steps)
devices = None                           # None: one GPU if present, else CPU
output_root = "results/runs/unseen_cell_type"  # results/runs/<setting>: the compare notebook looks there
seed = 42
run_mode = "sequential"                  # "sequential" | "scripts_only"
launcher = "bash"                        # "bash" | "slurm" (writes .sbatch files)
overwrite = False                        # True: retrain finished variants (old run dirs are moved aside)
extra_overrides = []                     # more config overrides as the CLI takes them (dot notation)
scripts_dir = "train_scripts"            # where the scripts go (relative to the repository root)
logs_dir = "logs"                        # where `tee` writes <variant>_training.log
show_tensorboard = False                 # True: TensorBoard on output_root inside this notebook (JupyterLab)"""),
    new_code_cell("""import os
from stlib import notebook, train_scripts

root = notebook.find_repo_root()
os.chdir(root)
overrides = notebook.training_overrides(data_toml, base_checkpoint, max_steps, batch_size, lr, devices, output_root,
                                        seed, extra_overrides)
specs = train_scripts.plan_scripts(variants, out_dir=scripts_dir, overrides=overrides, log_dir=logs_dir, launcher=launcher)
print("\\n".join(str(s.path) for s in specs))"""),
    new_markdown_cell("Commands to run the variants yourself — one after another, side by side on several GPUs, and TensorBoard for all of them:"),
    new_code_cell("""print("\\n".join(f"bash {s.path} 2>&1 | tee {s.log}" for s in specs))
print()
print("\\n".join(train_scripts.parallel_commands(specs, gpus=[0, 1, 2, 3])))
print()
print(train_scripts.tensorboard_command(specs))"""),
    new_code_cell("""if show_tensorboard:  # tensorboard's notebook extension, run from this kernel's venv; or the command above
    notebook.tensorboard(output_root)"""),
    new_code_cell("""status = train_scripts.run_scripts(specs, overwrite=overwrite) if run_mode == "sequential" and launcher == "bash" else None"""),
    new_code_cell("""train_scripts.status_table(specs)"""),
])

compare = nb([
    new_markdown_cell("""# Compare results

Predicts the held-out cells of the **test split, once**, with every trained variant of every setting — unseen
cell types (`[zeroshot]`) and unseen mice (`[heldout_batches]`) — and scores them beside the baselines a reviewer
expects: `control_mean` (no effect), `mean_shift` (pooled training shift), `celltype_time_shift` (the training
shift of the same cell type and day, where that cell type was seen) and `additive_linear` (cell type + day +
perturbation effects, least squares on training groups), all predicted from the models' own control cells. The
pretrained negative control is the `baseline` variant. Every metric comes with a 95 % bootstrap interval over
held-out groups; settings are chosen on the validation split (`stlib evaluate` on `--split val`), not here.
Figures and CSVs land in `results/`.

Batch run: `papermill notebooks/compare_results.ipynb results/executed/compare_results.ipynb -k stlib`"""),
    params("""variants = ["baseline", "st_lora", "st_lora_mhc", "st_lora_velocity", "st_lora_mhc_velocity"]
settings = ["unseen_cell_type", "unseen_mouse"]   # each trained under <runs_root>/<setting>/
runs_root = "results/runs"
results_dir = "results"
predictions_dir = "results/predictions"
split = "test"                                    # scored once per study"""),
    new_code_cell("""%matplotlib inline
import os
from stlib import notebook

os.chdir(notebook.find_repo_root())
preds = notebook.predict_study(variants, settings, runs_root, predictions_dir, split)
preds"""),
    new_markdown_cell("## Accuracy on held-out groups, with 95 % intervals (models and baselines)"),
    new_code_cell("""summary, per_celltype, per_group = notebook.evaluate_study(preds, results_dir)
summary[["setting", "model", "n_groups", "gene_correlation", "gene_correlation_lo", "gene_correlation_hi",
         "emb_gene_correlation", "emb_gene_correlation_lo", "emb_gene_correlation_hi", "de_overlap_50", "mse"]]"""),
    new_code_cell("""notebook.metrics_intervals_figure(summary, results_dir)"""),
    new_code_cell("""notebook.metrics_heatmap_figure(summary, per_celltype, results_dir)"""),
    new_markdown_cell("""## Each model against the best baseline

`better_by` > 0 means the model is better (for `mse`: lower); a claim holds only where `better_by_lo` > 0."""),
    new_code_cell("""notebook.baseline_comparison(per_group, results_dir)"""),
    new_code_cell("""per_celltype"""),
    new_markdown_cell("## Training dynamics: loss curves and gradient-norm stability"),
    new_code_cell("""for setting in preds:
    scalars = notebook.load_all_scalars(variants, f"{runs_root}/{setting}")
    display(notebook.loss_curves_figure(scalars, results_dir, setting))
    display(notebook.grad_norm_figure(scalars, results_dir, setting))
    display(notebook.training_dynamics_table(variants, f"{runs_root}/{setting}", results_dir, setting))"""),
    new_markdown_cell("## Real vs predicted cells: one shared UMAP per setting, one panel per model"),
    new_code_cell("""for setting, paths in preds.items():
    display(notebook.umap_figure(paths, results_dir, setting))"""),
])
nbf.write(train, NOTEBOOKS / "train_all_variants.ipynb")
nbf.write(compare, NOTEBOOKS / "compare_results.ipynb")
print("ok")
