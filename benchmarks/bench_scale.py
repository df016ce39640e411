"""The user's study at its real size, every stage timed: data -> base -> velocity -> fine-tune -> predict -> evaluate
-> compare figures, with wall time, peak memory and disk per stage, and the fine-tune projected to 10,000 steps.

Generates a 57,298-cell Burn/Sham study (3,000 genes with spliced/unspliced counts and a log1p layer, a 2000-d
embedding, the 2,000 most variable genes' log-expression as obsm["X_hvg"], the users' obs columns, whole Burn
mice held out) and an ST-Tahoe-shaped base with random weights (hidden 1488, 4-layer encoders, 6 LLaMA layers of
12 heads x 124, FFN 5952, reading X_hvg with an output ReLU: ~0.29 B parameters) written as a State run dir by
stlib's own writer (:func:`stlib.models.state_checkpoint.write_state_run`). Then runs the real commands as
subprocesses: `stlib velocity`, `stlib train` (configs/variants/st_lora.yaml, a few steps on the CPU),
`stlib predict`, `stlib evaluate`, and the compare notebook's figure functions.

    .venv/bin/python benchmarks/bench_scale.py [--cells 57298] [--steps 3] [--set-len 64] [--tiny]   (make bench-scale)

--cells scales the study down; --tiny swaps in a small base of the same layout (for the test suite). Writes
benchmarks/scale.md (--out); everything else goes under --work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
MOUSE_COLUMNS = {"pert_col": "condition", "control_pert": "Sham", "cell_type_key": "cell_types_simple_short",
                 "batch_col": "mouse_id", "time_col": "day"}
HVG = 2000


def disk_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def make_study(work: Path, n_cells: int, n_genes: int, embed_dim: int) -> Path:
    """The study's .h5ad and its split TOML (every cell type trains; one Burn mouse per day validates, one tests)."""
    import scipy.sparse as sp

    from stlib.data.io import write_h5ad
    from stlib.data.synthetic import heldout_mice, make_wound_healing, write_state_toml

    adata = make_wound_healing(n_cells=n_cells, n_genes=n_genes, seed=0, embed_dim=embed_dim)
    adata.obsm[f"X_state_{embed_dim}"] = adata.obsm.pop("X_state")
    log1p = adata.layers["log1p"]
    mean = np.asarray(log1p.mean(axis=0)).ravel()
    var = np.asarray(log1p.multiply(log1p).mean(axis=0)).ravel() - mean**2
    hvg = np.sort(np.argsort(-var)[:min(HVG, n_genes)])
    adata.obsm["X_hvg"] = np.asarray(log1p[:, hvg].toarray() if sp.issparse(log1p) else log1p[:, hvg], np.float32)
    data = work / "study.h5ad"
    write_h5ad(adata, data)
    write_state_toml(work / "study.toml", datasets={"study": data.name}, training={"study": "train"},
                     heldout_batches={f"study.{m}": s for m, s in heldout_mice().items()})
    return data


def make_base(work: Path, tiny: bool, input_dim: int = HVG, n_perts: int = 380) -> Path:
    """An ST-Tahoe-shaped State run dir with random weights, reading X_hvg (2000 HVG log-expression)."""
    import dataclasses

    import torch
    from checkpoint_size import TAHOE

    from stlib.config import Config
    from stlib.models.state_checkpoint import write_state_run
    from stlib.models.state_transition import StateTransitionModel

    shape = TAHOE if not tiny else dataclasses.replace(TAHOE, hidden_dim=64, n_layers=2, n_heads=4, head_dim=16,
                                                       intermediate_size=128, n_encoder_layers=2, n_decoder_layers=2,
                                                       embed_vocab_size=100)
    torch.manual_seed(0)
    model = StateTransitionModel(shape, input_dim=input_dim, pert_dim=n_perts)  # no gene decoder: it reads genes already
    names = ["DMSO_TF", *(f"drug_{i:03d}" for i in range(n_perts - 1))]
    data = {"embed_key": "X_hvg", "output_space": "gene", **{k: v for k, v in MOUSE_COLUMNS.items() if k != "time_col"}}
    data["control_pert"] = "DMSO_TF"
    return write_state_run(work / "st_tahoe_like", model, Config(model=shape), data, names)


STATE = REPO / "benchmarks" / ".venv" / "bin" / "state"  # arc-state, where benchmarks/run.py installed it


def state_tahoe_args(work: Path, set_len: int) -> list[str]:
    """`state tx train` of one step at ST-Tahoe's shape on the study (every cell trains: it is a base, not a study)."""
    from stlib.data.synthetic import write_state_toml

    (work / "state_data").mkdir(exist_ok=True)
    link = work / "state_data" / "study.h5ad"  # State's TOML names folders of .h5ad files
    if not link.exists():
        link.symlink_to(work / "study.h5ad")
    toml = write_state_toml(work / "state.toml", datasets={"study": str(work / "state_data")},
                            training={"study": "train"})
    backbone = "model.kwargs.transformer_backbone_kwargs"
    return [str(STATE), "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
            "data.kwargs.output_space=gene", *(f"data.kwargs.{k}={v}" for k, v in MOUSE_COLUMNS.items()
                                               if k != "time_col"),
            "data.kwargs.num_workers=0", "model=state", "model.kwargs.hidden_dim=1488", f"model.kwargs.cell_set_len={set_len}",
            "model.kwargs.n_encoder_layers=4", "model.kwargs.n_decoder_layers=4", f"{backbone}.num_hidden_layers=6",
            f"{backbone}.num_attention_heads=12", f"{backbone}.num_key_value_heads=12", f"{backbone}.head_dim=124",
            f"{backbone}.intermediate_size=5952", "training.batch_size=8", "training.max_steps=1", "training.val_freq=1",
            "training.ckpt_every_n_steps=1", "use_wandb=false", f"output_dir={work}", "name=state_tahoe"]


def run_stage(command: list[str], log: Path) -> dict:
    """Run a command under /usr/bin/time -v: wall seconds, peak RSS (GiB) of the process tree's largest member."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as fh:
        done = subprocess.run(["/usr/bin/time", "-v", *command], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                              check=False)
    text = log.read_text()
    if done.returncode:
        raise SystemExit(f"stage failed (exit {done.returncode}): {shlex.join(command)}; see {log}\n{text[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": time.time() - started, "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=57298)
    parser.add_argument("--genes", type=int, default=3000)
    parser.add_argument("--embed-dim", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3, help="fine-tune steps on the CPU (the projection scales them)")
    parser.add_argument("--set-len", type=int, default=64, help="cell_set_len for the CPU run (ST-Tahoe: up to 512)")
    parser.add_argument("--tiny", action="store_true", help="a small base of the same layout (test suite)")
    parser.add_argument("--reuse", action="store_true", help="keep the study and base already in --work")
    parser.add_argument("--velocity-args", default="", help="extra `stlib velocity` flags, e.g. '--n-top-genes 2000'")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "scale")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "scale.md")
    parser.add_argument("--no-state", action="store_true", help="skip the arc-state base even where it is installed")
    parser.add_argument("--only-make", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.only_make:
        make_base(work, args.tiny, min(HVG, args.genes))
        make_study(work, args.cells, args.genes, args.embed_dim)
        return
    py = [sys.executable, "-m", "stlib"]
    rows: list[tuple[str, dict, float]] = []

    def record(name: str, stats: dict, written: Path | None) -> None:
        rows.append((name, stats, disk_mib(written) if written else 0.0))
        print(f"[bench-scale] {name}: {stats['wall_s']:.1f} s, peak {stats['peak_rss_gib']:.2f} GiB", flush=True)

    data, base = work / "study.h5ad", work / "st_tahoe_like"
    if not (args.reuse and data.exists() and base.exists()):
        # in a child process: the generator's peak memory is returned to the system before the stages run
        record(f"generate data ({args.cells:,} cells x {args.genes:,} genes)", run_stage(
            [sys.executable, __file__, "--only-make", "--cells", str(args.cells), "--genes", str(args.genes),
             "--embed-dim", str(args.embed_dim), "--work", str(work), *(["--tiny"] if args.tiny else [])],
            work / "logs" / "make.log"), data)
        record("write the ST-Tahoe-shaped base (State run dir)", {"wall_s": float("nan"), "peak_rss_gib": float("nan")},
               base)
    n_params = sum(v.numel() for v in __import__("torch").load(base / "checkpoints" / "final.ckpt", weights_only=True,
                                                               mmap=True)["state_dict"].values())

    record(f"stlib velocity (control cells only{', ' + args.velocity_args if args.velocity_args else ''})", run_stage(
        [*py, "velocity", str(data), "--embed-key", "X_hvg", "--pert-col", "condition", "--control-pert", "Sham",
         "--force", *shlex.split(args.velocity_args)], work / "logs" / "velocity.log"), data)  # a copy, renamed
    runs = work / "runs"
    for old_run in (runs, work / "runs_state", work / "state_tahoe"):  # a re-run starts its runs afresh
        shutil.rmtree(old_run, ignore_errors=True)

    def train_command(init_from: Path, output_dir: Path, *extra: str) -> list[str]:
        """`stlib train` of st_lora from a base on the study, a few steps on the CPU."""
        return [*py, "train", "--config", "configs/variants/st_lora.yaml", f"data.toml_config_path={work / 'study.toml'}",
                f"model.init_from={init_from}", "data.embed_key=X_hvg", *(f"data.{k}={v}" for k, v in MOUSE_COLUMNS.items()),
                f"output_dir={output_dir}", f"training.max_steps={args.steps}", f"model.cell_set_len={args.set_len}",
                "training.progress_bar=false", *extra]

    train_log = work / "logs" / "train.log"
    stats = run_stage(train_command(base, runs, "data.gene_layer=log1p"), train_log)
    record(f"stlib train st_lora ({args.steps} steps, set {args.set_len}, CPU)", stats, runs / "st_lora")
    summary = json.loads((runs / "st_lora" / "run_summary.json").read_text())
    if STATE.exists() and not (args.no_state or args.tiny):  # arc-state's own base at that shape, fine-tuned
        record("state tx train at ST-Tahoe's shape (arc-state, 1 step, CPU)",
               run_stage(state_tahoe_args(work, args.set_len), work / "logs" / "state_tahoe.log"),
               work / "state_tahoe")
        # its decoder predicts the 2,000 genes of X_hvg, not the 3,000 of the gene layer (stlib says so and stops):
        # fine-tuned in X_hvg space, which is HVG log-expression already
        record(f"stlib train st_lora from the State-made base ({args.steps} steps, X_hvg space)", run_stage(
            train_command(work / "state_tahoe", work / "runs_state", "data.output_space=embedding"),
            work / "logs" / "train_state.log"), work / "runs_state" / "st_lora")
    # the last progress line: seconds per step since training started (model and data loading excluded)
    paces = [1 / float(v) if unit == "steps/s" else float(v)
             for v, unit in re.findall(r"([\d.]+) (steps/s|s/step)", train_log.read_text())]
    step_s = paces[-1] if paces else float("nan")
    preds = work / "predictions"
    record("stlib predict (test mice)", run_stage(
        [*py, "predict", "--run-dir", str(runs / "st_lora"), "--split", "test", "--out-dir", str(preds)],
        work / "logs" / "predict.log"), preds)
    record("stlib evaluate", run_stage(
        [*py, "evaluate", "--predictions", str(preds / "st_lora_pred.h5ad"), "--out", str(work / "metrics")],
        work / "logs" / "evaluate.log"), work / "metrics")
    figures = work / "figures"
    record("compare figures (UMAP, heatmap, intervals)", run_stage(
        [sys.executable, "-c", ("import sys, pandas as pd; from pathlib import Path; from stlib import notebook; "
         f"p = {{'st_lora': Path({str(preds / 'st_lora_pred.h5ad')!r})}}; out = {str(figures)!r}; "
         "notebook.umap_figure(p, out); s, c = notebook.evaluate_all(p, out); "
         "notebook.metrics_heatmap_figure(s, c, out); notebook.metrics_intervals_figure(s, out)")],
        work / "logs" / "figures.log"), figures)

    ckpt_mib = disk_mib(runs / "st_lora" / "checkpoints")
    per_step = summary["wall_time_s"] / max(summary["steps"], 1)
    lines = [
        "# The user's study at its real size, stage by stage", "",
        (f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · python "
         f"{sys.version.split()[0]} · load before the run {os.getloadavg()[0]:.1f}"), "",
        (f"Command: `.venv/bin/python benchmarks/bench_scale.py --cells {args.cells} --steps {args.steps} "
        f"--set-len {args.set_len}{' --tiny' if args.tiny else ''}` (`make bench-scale`)"), "",
        (f"Study: {args.cells:,} cells x {args.genes:,} genes, {args.embed_dim}-d embedding, X_hvg "
         f"{min(HVG, args.genes)} genes. Velocity is written into the study file in place. Base: "
         f"{n_params / 1e6:.1f} M parameters ({disk_mib(base / 'checkpoints' / 'final.ckpt'):.0f} MiB)."), "",
        "| stage | wall (s) | peak RSS (GiB) | disk written (MiB) |", "|---|---|---|---|",
        *(f"| {name} | {s['wall_s']:.1f} | {s['peak_rss_gib']:.2f} | {mib:.0f} |".replace("| nan | nan |", "| (with the data) | |")
          for name, s, mib in rows), "",
        ("Disk written: the study file for `stlib velocity` (it adds its keys to a copy of the file and renames it "
         "into place, so the file's size is needed again while it runs); the run dir, predictions and figures for "
         "the others."), "",
        "## Projection to the users' 10,000 steps", "",
        (f"- The fine-tune's steps on this CPU took {step_s:.1f} s each (the last progress line: since training "
         f"started; {per_step:.1f} s per step with model and data loading): 10,000 steps would take "
         f"{10_000 * step_s / 3600:.0f} h here. The users train on one GPU; "
         "no GPU was lent to this session, so the GPU rate is unmeasured (benchmarks/bench_gpu.py measures it)."),
        (f"- Checkpoints: {ckpt_mib:.0f} MiB in checkpoints/ after this run. Retention keeps "
         "`training.keep_checkpoints` (2) step checkpoints + last + final, so a 10,000-step run holds the same number "
         "of files of the same size: the disk does not grow with the steps."),
        "",
    ]
    if (work / "runs_state" / "st_lora").exists():
        lines[-1:-1] = [
            (f"- arc-state's own base at this shape: its checkpoints/ hold "
             f"{disk_mib(work / 'state_tahoe' / 'checkpoints'):.0f} MiB after one step (whole weights and optimizer "
             f"state per file); stlib's LoRA fine-tune of it {disk_mib(work / 'runs_state' / 'st_lora' / 'checkpoints'):.0f}"
             " MiB (what trains, the base named by hash). It loads strictly and fine-tunes in X_hvg space: its gene "
             "decoder predicts the 2,000 X_hvg genes, and stlib stops before training if given the 3,000-gene layer.")]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
