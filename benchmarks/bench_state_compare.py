"""Side-by-side ST training benchmark: stlib vs arc-state's `state tx train`, and stlib's fine-tuning variants.

Both tools train on the same generated data (`stlib make-data`: 6000 wound-healing cells, 200 genes, 64-d
``X_state``; a copy gets ``obsm["X_hvg"]`` = the log1p layer, State's gene target) with the same model: hidden
128, 8 layers, 8 heads x 16, FFN 512, cell_set_len 64, batch 8, gene decoder 1024-1024-512, energy loss,
num_workers 0, gradient clipping 10, no validation or checkpoint inside the timed window.

Every run is a fresh process started through this file's ``--hook`` mode (stdlib-only imports, so it runs in
either venv): it sets torch's thread count, adds one Lightning callback to whatever Trainer the tool builds
(a wall-clock timestamp after each optimizer step, plus validation intervals), then calls the tool's own console
script. Both tools are therefore timed by the same code. Peak RSS is the kernel's ru_maxrss of the child
(``os.wait4``). Steady-state rate = steps ``warmup..max_steps`` over their wall time minus validation time.
Runs alternate the order (A B, B A, ...): the 2-core machine is shared and drifts, ratios within a pair hold.

    python benchmarks/bench_state_compare.py [--only state variants startup] [--quick] [--threads 1]

`benchmarks/run.py` calls this (and installs arc-state into benchmarks/.venv first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_PYTHON = REPO / "benchmarks" / ".venv" / "bin" / "python"
MAIN_PYTHON = Path(sys.executable)
N_GENES = 200
BATCH, SET_LEN = 8, 64
CELLS_PER_STEP = BATCH * SET_LEN
ENV_TIMES, ENV_THREADS, ENV_T0 = "STBENCH_TIMES", "STBENCH_THREADS", "STBENCH_T0"


# ------------------------------------------------------------------------------ child side: the step timer


def _install_step_timer(out_path: str) -> None:
    """Add a timing callback to every Lightning Trainer this process builds (the tool never knows)."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self):
            self.record = {"t0": float(os.environ[ENV_T0]), "steps": [], "val": [], "threads": None}

        def on_fit_start(self, trainer, pl_module):
            import torch

            self.record.update(fit_start=time.time(), threads=torch.get_num_threads(), torch=torch.__version__)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.record["steps"].append((trainer.global_step, time.time(), time.process_time()))

        def on_validation_start(self, trainer, pl_module):
            self.record["val"].append([time.time(), None])

        def on_validation_end(self, trainer, pl_module):
            self.record["val"][-1][1] = time.time()

        def on_fit_end(self, trainer, pl_module):
            import torch

            self.record["fit_end"] = time.time()
            if torch.cuda.is_available():
                self.record["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            Path(out_path).write_text(json.dumps(self.record))

    original_init = pl.Trainer.__init__

    def init_with_timer(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.pop("callbacks", None) or []), StepTimer()]
        original_init(self, *args, **kwargs)

    pl.Trainer.__init__ = init_with_timer


def _hook_main(argv: list[str]) -> int:
    """`--hook <console script> args...`: set threads, install the timer, run the tool's own entry point."""
    from importlib.metadata import entry_points

    import torch

    torch.set_num_threads(int(os.environ[ENV_THREADS]))
    _install_step_timer(os.environ[ENV_TIMES])
    script, *args = argv
    (entry,) = entry_points(group="console_scripts", name=script)
    sys.argv = [script, *args]
    result = entry.load()()
    return result if isinstance(result, int) else 0


# ------------------------------------------------------------------------------ parent side: one run


@dataclass
class Run:
    tool: str
    name: str
    steps_per_s: float
    median_step_ms: float
    cpu_steps_per_s: float  # steps per CPU-second of the whole process: load-independent cost
    first_step_s: float  # process start -> first optimizer step done
    setup_s: float  # process start -> Lightning fit start (imports, data loading, model build)
    peak_rss_mib: float
    wall_s: float
    threads: int | None
    cuda_peak_mib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def cells_per_s(self) -> float:
        return self.steps_per_s * CELLS_PER_STEP


class BenchRunError(RuntimeError):
    """A benchmarked command failed; the message names its log."""


def steady_rate(steps: list, val: list, warmup: int) -> tuple[float, float, float]:
    """From (step, wall time, process CPU time) triples: steps/s over steps warmup..last (no validation inside),
    median per-step ms, and steps per CPU-second (all threads) — the rate other processes' load disturbs least."""
    window = [row for row in steps if row[0] >= warmup]
    if len(window) < 2:
        raise ValueError(f"only {len(window)} steps at or after warm-up step {warmup}: raise max_steps")
    (s0, t0, c0), (s1, t1, c1) = window[0], window[-1]
    if any(start < t1 and (end or t1) > t0 for start, end in val):
        raise ValueError("validation ran inside the timed window; its CPU time cannot be separated")
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(window) if b[0] == a[0] + 1]
    return (s1 - s0) / (t1 - t0), statistics.median(gaps) * 1e3, (s1 - s0) / (c1 - c0)


def launch(python: Path, script: str, args: list[str], log: Path, threads: int, warmup: int, device: str,
           run_dir: Path | None, cwd: Path = REPO) -> Run:
    """One training process under the step timer; returns its steady rate, start-up and peak RSS."""
    times = log.with_suffix(".times.json")
    times.unlink(missing_ok=True)
    if run_dir is not None:  # a leftover run dir would make either tool resume instead of train
        shutil.rmtree(run_dir, ignore_errors=True)
    env = os.environ | {
        ENV_TIMES: str(times), ENV_THREADS: str(threads), "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [str(python), str(Path(__file__).resolve()), "--hook", script, *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        env[ENV_T0] = repr(time.time())
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode or not times.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise BenchRunError(f"{script} run {log.stem} failed (exit {proc.returncode}); log {log}:\n{tail}")
    rec = json.loads(times.read_text())
    rate, step_ms, cpu_rate = steady_rate(rec["steps"], rec["val"], warmup)
    return Run(tool=script, name=log.stem, steps_per_s=rate, median_step_ms=step_ms, cpu_steps_per_s=cpu_rate,
               first_step_s=rec["steps"][0][1] - rec["t0"], setup_s=rec["fit_start"] - rec["t0"],
               peak_rss_mib=usage.ru_maxrss / 1024, wall_s=wall, threads=rec["threads"],
               cuda_peak_mib=rec.get("cuda_peak_mib"))


# ------------------------------------------------------------------------------ data and command lines


def prepare_data(work: Path) -> Path:
    """Generate the data once (`stlib make-data`) and a copy both tools read; returns the split TOML."""
    from stlib.data.synthetic import ZEROSHOT, write_default_data, write_state_toml

    toml = work / "task.toml"
    h5ad = work / "state_data" / "wound_healing.h5ad"
    if toml.exists() and h5ad.exists():
        print(f"[bench] data: reusing {h5ad}", flush=True)
        return toml
    import anndata as ad
    import numpy as np

    print(f"[bench] data: stlib make-data (n_genes={N_GENES}) -> {work / 'generated'}", flush=True)
    paths = write_default_data(work / "generated", n_genes=N_GENES, seed=0)
    adata = ad.read_h5ad(paths["wound_healing"])
    # State's output_space=gene reads its target genes from obsm["X_hvg"]; stlib reads layers["log1p"]: same values
    adata.obsm["X_hvg"] = adata.layers["log1p"].toarray().astype(np.float32)
    h5ad.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(h5ad)
    write_state_toml(toml, datasets={"wound_healing": "state_data"}, training={"wound_healing": "train"},
                     zeroshot={f"wound_healing.{ct}": split for ct, split in ZEROSHOT.items()})
    print(f"[bench] data: State-readable copy with obsm['X_hvg'] -> {h5ad}; splits {toml}", flush=True)
    return toml


def state_args(toml: Path, out_dir: Path, name: str, steps: int) -> list[str]:
    """`state tx train` at the benchmark configuration (anchors.md's command, validation/ckpt at the end)."""
    backbone = "model.kwargs.transformer_backbone_kwargs"
    return [
        "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_state",
        "data.kwargs.output_space=gene", "data.kwargs.pert_col=condition", "data.kwargs.control_pert=Sham",
        "data.kwargs.cell_type_key=cell_types_simple_short", "data.kwargs.batch_col=mouse_id",
        "data.kwargs.num_workers=0", "model=state", "model.kwargs.hidden_dim=128",
        f"model.kwargs.cell_set_len={SET_LEN}", f"{backbone}.num_hidden_layers=8", f"{backbone}.num_attention_heads=8",
        f"{backbone}.num_key_value_heads=8", f"{backbone}.head_dim=16", f"{backbone}.intermediate_size=512",
        f"training.batch_size={BATCH}", f"training.max_steps={steps}", f"training.val_freq={steps}",
        f"training.ckpt_every_n_steps={steps}", "use_wandb=false", f"output_dir={out_dir}", f"name={name}",
    ]


def stlib_config(toml: Path, device: str) -> list[str]:
    """The same configuration in stlib's keys (decoder 1024-1024-512 and lr 1e-4 are stlib's defaults too)."""
    return [
        f"data.toml_config_path={toml}", "data.embed_key=X_state", "data.output_space=gene", "data.gene_layer=log1p",
        "data.pert_col=condition", "data.control_pert=Sham", "data.cell_type_key=cell_types_simple_short",
        "data.batch_col=mouse_id", "data.num_workers=0", "model.hidden_dim=128", "model.n_layers=8",
        "model.n_heads=8", "model.head_dim=16", "model.intermediate_size=512", f"model.cell_set_len={SET_LEN}",
        "model.decoder_hidden=[1024,1024,512]", "model.loss=energy", f"training.batch_size={BATCH}",
        "training.lr=1e-4", "training.gradient_clip_val=10", "training.progress_bar=false",
        f"training.accelerator={'cpu' if device == 'cpu' else 'auto'}",
    ]


def run_keys(out_dir: Path, name: str, steps: int) -> list[str]:
    """Per-run keys: validation and the step checkpoint only at the last step, outside the timed window."""
    return [f"name={name}", f"output_dir={out_dir}", f"training.max_steps={steps}",
            f"training.val_every_n_steps={max(steps, 1)}", f"training.ckpt_every_n_steps={max(steps, 1)}"]


def write_stlib_config(work: Path, toml: Path, device: str) -> Path:
    """`stlib train --config <this>`: the benchmark configuration as a YAML file a user can rerun."""
    from omegaconf import OmegaConf

    path = work / "stlib_bench.yaml"
    text = OmegaConf.to_yaml(OmegaConf.from_dotlist(stlib_config(toml, device)))
    path.write_text("# written by benchmarks/bench_state_compare.py: the arc-state comparison configuration\n" + text)
    return path


# ------------------------------------------------------------------------------ sections


@dataclass
class Settings:
    work: Path
    threads: int
    steps: int
    warmup: int
    runs: int
    device: str
    variant_steps: int
    variant_runs: int
    variant_warmup: int = 25


def _fmt(values: list[float], spec: str = ".2f") -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}–{max(values):{spec}})"


def compare_state(s: Settings, toml: Path) -> tuple[str, list[str], dict]:
    """Section 1: alternating stlib / arc-state pairs; per-pair ratio, peak RSS, start-up."""
    if not BENCH_PYTHON.exists():
        raise BenchRunError(f"{BENCH_PYTHON} missing: run benchmarks/run.py, which installs arc-state there")
    runs_dir = s.work / "runs"
    config = write_stlib_config(s.work, toml, s.device)
    pairs = []
    for i in range(s.runs):
        order = ("state", "stlib") if i % 2 == 0 else ("stlib", "state")
        pair = {}
        for tool in order:
            name = f"{tool}_{i}"
            print(f"[bench] pair {i + 1}/{s.runs}: {tool} ({s.steps} steps)", flush=True)
            if tool == "state":
                run = launch(BENCH_PYTHON, "state", state_args(toml, runs_dir, name, s.steps), s.work / "logs" /
                             f"{name}.log", s.threads, s.warmup, s.device, runs_dir / name, cwd=s.work)
            else:
                args = ["train", "--config", str(config), *run_keys(runs_dir, name, s.steps)]
                run = launch(MAIN_PYTHON, "stlib", args, s.work / "logs" / f"{name}.log", s.threads, s.warmup, s.device,
                             runs_dir / name)
            print(f"[bench]   {run.steps_per_s:.2f} steps/s, {run.cpu_steps_per_s:.2f} steps/CPU-s, peak RSS "
                  f"{run.peak_rss_mib:.0f} MiB, first step {run.first_step_s:.1f} s", flush=True)
            pair[tool] = run
        pairs.append(pair)

    keys = ("steps_per_s", "cells_per_s", "cpu_steps_per_s", "peak_rss_mib", "median_step_ms", "first_step_s")
    col = {t: {k: [getattr(p[t], k) for p in pairs] for k in keys} for t in ("state", "stlib")}
    wall = [p["stlib"].steps_per_s / p["state"].steps_per_s for p in pairs]
    cpu = [p["stlib"].cpu_steps_per_s / p["state"].cpu_steps_per_s for p in pairs]
    lines = [
        (f"Steady-state steps {s.warmup}..{s.steps} of {s.steps} ({CELLS_PER_STEP} cells/step), torch threads "
         f"{s.threads}, device {s.device}; order alternates per pair. *Wall* = steps per wall-clock second; *CPU* = "
         "steps per CPU-second of the whole process (all its threads), which other processes' load disturbs least."),
        "",
        ("| pair | order | arc-state steps/s | stlib steps/s | stlib / arc-state (wall) | arc-state steps/CPU-s "
         "| stlib steps/CPU-s | stlib / arc-state (CPU) | arc-state peak RSS MiB | stlib peak RSS MiB |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(pairs):
        a, b = p["state"], p["stlib"]
        lines.append(f"| {i + 1} | {'state, stlib' if i % 2 == 0 else 'stlib, state'} | {a.steps_per_s:.2f} | "
                     f"{b.steps_per_s:.2f} | **{wall[i]:.2f}×** | {a.cpu_steps_per_s:.2f} | {b.cpu_steps_per_s:.2f} | "
                     f"**{cpu[i]:.2f}×** | {a.peak_rss_mib:.0f} | {b.peak_rss_mib:.0f} |")
    lines += [
        (f"| median (min–max) | | {_fmt(col['state']['steps_per_s'])} | {_fmt(col['stlib']['steps_per_s'])} | "
         f"**{_fmt(wall)}** | {_fmt(col['state']['cpu_steps_per_s'])} | {_fmt(col['stlib']['cpu_steps_per_s'])} | "
         f"**{_fmt(cpu)}** | {_fmt(col['state']['peak_rss_mib'], '.0f')} | {_fmt(col['stlib']['peak_rss_mib'], '.0f')} |"),
        "",
        (f"Cells/s (wall), median: arc-state {statistics.median(col['state']['cells_per_s']):.0f}, stlib "
         f"{statistics.median(col['stlib']['cells_per_s']):.0f}. Median single-step time: arc-state "
         f"{statistics.median(col['state']['median_step_ms']):.0f} ms, stlib "
         f"{statistics.median(col['stlib']['median_step_ms']):.0f} ms."),
    ]
    if s.device != "cpu":
        lines.append("CUDA peak allocated MiB: " + ", ".join(
            f"{t} {statistics.median([p[t].cuda_peak_mib or 0 for p in pairs]):.0f}" for t in ("state", "stlib")))
    rss = {t: statistics.median(col[t]["peak_rss_mib"]) for t in col}
    summary = [
        (f"ST training throughput (hidden 128, 8 layers, set 64, batch 8, {s.threads} thread(s), {s.steps} steps): "
         f"stlib / arc-state **{statistics.median(wall):.2f}×** by wall clock (per pair {min(wall):.2f}–{max(wall):.2f}×; "
         f"stlib {statistics.median(col['stlib']['cells_per_s']):.0f} vs "
         f"{statistics.median(col['state']['cells_per_s']):.0f} cells/s), **{statistics.median(cpu):.2f}×** by CPU time "
         f"(per pair {min(cpu):.2f}–{max(cpu):.2f}×); goal ≥ 1.5×. Peak RSS {rss['stlib']:.0f} vs {rss['state']:.0f} MiB "
         f"({'not above' if rss['stlib'] <= rss['state'] else 'ABOVE'} arc-state).")
    ]
    return "\n".join(lines), summary, {"pairs": pairs}


VARIANTS = {  # name -> (config file, extra overrides); every one fine-tunes the same base
    "full fine-tune": ("configs/variants/st_lora.yaml", ["model.lora.enable=false"]),
    "LoRA": ("configs/variants/st_lora.yaml", []),
    "LoRA+mHC": ("configs/variants/st_lora_mhc.yaml", []),
    "LoRA+velocity": ("configs/variants/st_lora_velocity.yaml", []),
    "LoRA+mHC+velocity": ("configs/variants/st_lora_mhc_velocity.yaml", []),
}
PLAIN = "full fine-tune"


def _variant_overrides(toml: Path, out_dir: Path, name: str, steps: int, device: str, base: Path) -> list[str]:
    """The variant's own YAML, moved onto the benchmark data and set size; the architecture comes from the base."""
    keep = ("data.", "training.", "model.cell_set_len=", "model.loss=")
    common = [o for o in stlib_config(toml, device) if o.startswith(keep)]
    return [*common, *run_keys(out_dir, name, steps), f"model.init_from={base}", "training.warmup_steps=20"]


def make_base(s: Settings, toml: Path) -> Path:
    """An untrained model at the benchmark architecture (max_steps=0 writes it): the variants' common base."""
    base = s.work / "runs" / "base"
    if (base / "checkpoints" / "final.ckpt").exists():
        return base
    print(f"[bench] base model (max_steps=0) -> {base}", flush=True)
    config = write_stlib_config(s.work, toml, s.device)
    code = subprocess.call([str(MAIN_PYTHON), "-m", "stlib", "train", "--config", str(config),
                            *run_keys(s.work / "runs", "base", 0)], cwd=REPO, stdout=subprocess.DEVNULL)
    if code:
        raise BenchRunError(f"making the base model failed (exit {code})")
    return base


def ensure_velocity(toml: Path) -> None:
    """`stlib velocity` on the benchmark copy (cached in the file: a second call returns at once)."""
    h5ad = toml.parent / "state_data" / "wound_healing.h5ad"
    print(f"[bench] velocity: stlib velocity {h5ad} --embed-key X_state", flush=True)
    code = subprocess.call([str(MAIN_PYTHON), "-m", "stlib", "velocity", str(h5ad), "--embed-key", "X_state"],
                           cwd=REPO, stdout=subprocess.DEVNULL)
    if code:
        raise BenchRunError(f"stlib velocity failed (exit {code})")


def compare_variants(s: Settings, toml: Path) -> tuple[str, list[str], dict]:
    """Section 2: every fine-tuning variant, rounds in rotating order; step time relative to full fine-tuning."""
    ensure_velocity(toml)
    base = make_base(s, toml)
    names = list(VARIANTS)
    rounds = []
    for i in range(s.variant_runs):
        shift = i % len(names)
        results = {}
        for name in names[shift:] + names[:shift]:
            config, extra = VARIANTS[name]
            run_name = f"variant_{name.replace(' ', '_').replace('+', '_')}_{i}"
            print(f"[bench] round {i + 1}/{s.variant_runs}: {name} ({s.variant_steps} steps)", flush=True)
            args = ["train", "--config", config,
                    *_variant_overrides(toml, s.work / "runs", run_name, s.variant_steps, s.device, base), *extra]
            run = launch(MAIN_PYTHON, "stlib", args, s.work / "logs" / f"{run_name}.log", s.threads, s.variant_warmup,
                         s.device, s.work / "runs" / run_name)
            params = json.loads((s.work / "runs" / run_name / "trainable_params.json").read_text())
            run.extra["trainable"] = params["trainable"]
            print(f"[bench]   {run.steps_per_s:.2f} steps/s, {run.cpu_steps_per_s:.2f} steps/CPU-s, peak RSS "
                  f"{run.peak_rss_mib:.0f} MiB, "
                  f"trainable {params['trainable']:,}", flush=True)
            results[name] = run
        rounds.append(results)

    lines = [
        (f"stlib only, fine-tuning an untrained base at the section-1 architecture; steady-state steps "
         f"{s.variant_warmup}..{s.variant_steps}, {s.variant_runs} rounds (order rotates), torch threads {s.threads}. "
         "`× full` = per-round ratio of step time to full fine-tuning's, median (min–max) over rounds; *CPU* uses "
         "CPU-seconds per step (load-independent), *wall* wall-clock seconds."),
        "",
        ("| variant | config | trainable params | steps/s | step time × full (wall) | CPU time × full "
         "| peak RSS MiB |"),
        "|---|---|---|---|---|---|---|",
    ]
    rel, rel_cpu = {}, {}
    for name in names:
        runs = [r[name] for r in rounds]
        rel[name] = [r[PLAIN].steps_per_s / r[name].steps_per_s for r in rounds]
        rel_cpu[name] = [r[PLAIN].cpu_steps_per_s / r[name].cpu_steps_per_s for r in rounds]
        config, extra = VARIANTS[name]
        lines.append(f"| {name} | `{Path(config).name}{' ' + ' '.join(extra) if extra else ''}` | "
                     f"{runs[0].extra['trainable']:,} | {_fmt([r.steps_per_s for r in runs])} | "
                     f"{_fmt(rel[name])} | {_fmt(rel_cpu[name])} | {_fmt([r.peak_rss_mib for r in runs], '.0f')} |")
    rss = {n: statistics.median([r[n].peak_rss_mib for r in rounds]) for n in names}
    med = {n: (statistics.median(rel[n]), statistics.median(rel_cpu[n])) for n in names}
    mhc = [med["LoRA+mHC"][i] / med["LoRA"][i] for i in (0, 1)]
    lines += ["", f"LoRA+mHC step time vs LoRA alone: {mhc[0]:.2f}× wall, {mhc[1]:.2f}× CPU."]
    summary = [
        "Variants (stlib, step time relative to full fine-tuning, wall / CPU): " + ", ".join(
            f"{n} {med[n][0]:.2f}× / {med[n][1]:.2f}×" for n in names[1:]) +
        f"; LoRA+mHC vs LoRA {mhc[0]:.2f}× / {mhc[1]:.2f}× (goal ≤ 1.3×). Peak RSS LoRA {rss['LoRA']:.0f} MiB vs "
        f"full fine-tune {rss[PLAIN]:.0f} MiB ({'below' if rss['LoRA'] < rss[PLAIN] else 'NOT below'})."
    ]
    return "\n".join(lines), summary, {"rounds": rounds}


def startup_table(pairs: list[dict]) -> tuple[str, list[str]]:
    """Section 4a: time to the first optimizer step, split into set-up (imports, data, model) and first step."""
    lines = ["| tool | process start → fit start s | process start → first step done s | whole process s |",
             "|---|---|---|---|"]
    medians = {}
    for tool, label in (("state", "arc-state"), ("stlib", "stlib")):
        runs = [p[tool] for p in pairs]
        medians[tool] = statistics.median(r.first_step_s for r in runs)
        lines.append(f"| {label} | {_fmt([r.setup_s for r in runs], '.1f')} | {_fmt([r.first_step_s for r in runs], '.1f')}"
                     f" | {_fmt([r.wall_s for r in runs], '.1f')} |")
    summary = [f"Start-up to the first training step: stlib {medians['stlib']:.1f} s, arc-state {medians['state']:.1f} s."]
    return "\n".join(lines), summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hook":
        sys.exit(_hook_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["state", "variants"], default=["state", "variants"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work")
    args = ap.parse_args()
    s = settings(args.work, args.threads, args.device, args.quick)
    toml = prepare_data(s.work)
    if "state" in args.only:
        text, summary, _ = compare_state(s, toml)
        print(text, "\n", *summary)
    if "variants" in args.only:
        text, summary, _ = compare_variants(s, toml)
        print(text, "\n", *summary)


def settings(work: Path, threads: int, device: str, quick: bool) -> Settings:
    work = work.resolve()  # State runs in its own cwd: every path it gets must be absolute
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")  # generated data and runs never get committed
    if quick:
        return Settings(work, threads, steps=40, warmup=10, runs=2, device=device, variant_steps=30, variant_runs=1,
                        variant_warmup=10)
    return Settings(work, threads, steps=200, warmup=50, runs=3, device=device, variant_steps=100, variant_runs=3)


if __name__ == "__main__":
    main()
