"""`stlib <command> [options] [key=value ...]` — the command line (State's grammar: dot-list overrides).

Bad input (a :class:`stlib.errors.StlibError`) ends with one line on stderr naming the problem and exit code 2;
`--debug` shows its traceback. Any other exception is a bug: its traceback is shown with a request to report it.
Heavy imports happen inside each command so `stlib --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from stlib.errors import StlibError

DEFAULT_PRETRAIN_CONFIG = "configs/pretrain.yaml"


def _cmd_make_data(args) -> None:
    from stlib.data.synthetic import write_default_data

    paths = write_default_data(args.out, n_cells=args.n_cells, n_genes=args.n_genes, embed_dim=args.embed_dim,
                               n_source_cells=args.n_source_cells, seed=args.seed)
    for name, path in paths.items():
        print(f"[stlib] wrote {name}: {path}")


def _load(args):
    from stlib.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_train(args) -> None:
    from stlib.train.run import train

    cfg = _load(args)
    train(cfg, args.overrides, resume=args.resume)


def _cmd_velocity(args) -> None:
    from stlib.data.velocity import run_velocity
    from stlib.errors import ConfigError

    if args.all_cells == (args.pert_col is not None or args.control_pert is not None):
        raise ConfigError("stlib velocity: give --pert-col and --control-pert (velocity from the control cells only, "
                          "the cells models read it from) or --all-cells (every cell shapes it, held-out ones included)")
    out = run_velocity(args.input, embed_key=args.embed_key, out_path=args.out or args.input, force=args.force,
                       pert_col=args.pert_col, control_pert=args.control_pert, n_jobs=args.n_jobs,
                       n_top_genes=args.n_top_genes or None)
    print(f"[stlib] velocity in obsm['velocity_{args.embed_key}'] and obs['velocity_confidence']: {out}")


def _cmd_predict(args) -> None:
    from stlib.evaluate.predict import predict_run

    pred, real = predict_run(args.run_dir, checkpoint=args.checkpoint, split=args.split, out_dir=args.out_dir,
                             name=args.name, data_overrides=args.overrides, gene_readout=args.gene_readout,
                             device=args.device, batch_size=args.batch_size)
    print(f"[stlib] predictions: {pred}\n[stlib] real cells:  {real}")


def _cmd_evaluate(args) -> None:
    from stlib.evaluate.metrics import evaluate_files, write_metrics

    summary, per_celltype = evaluate_files([Path(p) for p in args.predictions])
    paths = write_metrics(summary, per_celltype, args.out)
    with _pandas_wide():
        print(summary.to_string(index=False))
    print(f"[stlib] metrics written: {paths}")


def _pandas_wide():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3)


def _cmd_export(args) -> None:
    from stlib.loading import export_merged

    print(f"[stlib] merged model: {export_merged(args.run_dir, args.merged)}")


def _cmd_scripts(args) -> None:
    from stlib.train_scripts import write_train_scripts

    paths = write_train_scripts(args.variants, out_dir=args.out, configs_dir=args.configs_dir,
                                overrides=args.overrides, log_dir=args.log_dir, launcher=args.launcher)
    for path in paths:
        print(f"[stlib] wrote {path}")


def _cmd_demo(args) -> None:
    from stlib.demo import run_demo

    run_demo(max_steps=args.max_steps, root=Path(args.root), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stlib", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("make-data", help="write the embedded wound-healing + source-domain datasets and TOMLs")
    p.add_argument("--out", default="data", help="output folder (default: data/)")
    p.add_argument("--n-cells", type=int, default=6000)
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--n-source-cells", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_data)

    for name, helptext, default_config in (
        ("pretrain", "pretrain a base ST model on the source domain", DEFAULT_PRETRAIN_CONFIG),
        ("train", "train or fine-tune a model (model.init_from=<run dir|State dir|.ckpt>)", None),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", default=default_config, required=default_config is None, help="YAML config")
        p.add_argument("--resume", default=None, help="checkpoint to resume (default: the run dir's last.ckpt)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.max_steps=400")
        p.set_defaults(func=_cmd_train)

    p = sub.add_parser("velocity", help="RNA velocity (scvelo) projected into the model's embedding space")
    p.add_argument("input", help=".h5ad with layers spliced/unspliced")
    p.add_argument("--embed-key", default="X_state", help="obsm key of the model's space")
    p.add_argument("--out", default=None, help="output .h5ad (default: update the input file)")
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument("--pert-col", default=None, help="obs column naming perturbations (data.pert_col)")
    p.add_argument("--control-pert", default=None, help="its value for control cells (data.control_pert): "
                   "velocity is computed from these cells only")
    p.add_argument("--all-cells", action="store_true", help="compute from every cell instead (held-out ones too)")
    p.add_argument("--n-jobs", type=int, default=1, help="processes for scvelo's velocity graph")
    p.add_argument("--n-top-genes", type=int, default=0,
                   help="estimate on the N most variable genes (0 = all; changes the field: benchmarks/velocity_scale.md)")
    p.set_defaults(func=_cmd_velocity)

    p = sub.add_parser("predict", help="predict held-out perturbed cells -> <name>_pred.h5ad + <name>_real.h5ad")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint file name (default final.ckpt, else last.ckpt)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="split to predict (default val: choose settings there; the test split is scored once)")
    p.add_argument("--out-dir", default="results/predictions")
    p.add_argument("--name", default=None, help="model name in file names (default: the run dir's name)")
    p.add_argument("--gene-readout", default="residual", choices=["residual", "direct"],
                   help="decoded genes: basal genes + decoded change (default), or the decoder's output as is")
    p.add_argument("--device", default="auto", help="auto (a GPU where present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=16, help="cell sets per forward pass")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides (e.g. another TOML)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="metrics for prediction files -> CSV (baselines included)")
    p.add_argument("--predictions", nargs="+", required=True, help="<model>_pred.h5ad files (real file beside)")
    p.add_argument("--out", default="results/metrics_summary.csv",
                   help="summary CSV path (per-cell-type table beside it) or a folder for both")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write a standalone merged model (LoRA folded in, base included)")
    p.add_argument("run_dir", help="run dir (or .ckpt) of a trained model")
    p.add_argument("--merged", required=True, help="output .ckpt (loads with stlib.load_model)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("scripts", help="write train_scripts/train_<variant>.sh")
    p.add_argument("--variants", nargs="+", default=None, help="variants (default: all in configs/variants)")
    p.add_argument("--out", default="train_scripts")
    p.add_argument("--configs-dir", default="configs/variants")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--launcher", default="bash", choices=["bash", "slurm"])
    p.add_argument("overrides", nargs="*", help="key=value overrides written into every script")
    p.set_defaults(func=_cmd_scripts)

    p = sub.add_parser("demo", help="the whole study on the embedded default (what `make demo` runs)")
    p.add_argument("--max-steps", type=int, default=None, help="fine-tuning steps per variant")
    p.add_argument("--root", default=".", help="repository root (configs/, notebooks/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


DATA_COMMANDS = ("make-data", "pretrain", "train", "velocity", "predict", "evaluate", "demo")  # they report peak RSS


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[stlib] %(message)s"))
    stlib_log = logging.getLogger("stlib")
    stlib_log.addHandler(handler)
    stlib_log.setLevel(logging.INFO)
    stlib_log.propagate = False
    try:
        args.func(args)
        if args.command in DATA_COMMANDS:
            print(f"[stlib] peak memory (RSS): {peak_rss_gib():.2f} GiB", flush=True)
    except StlibError as exc:  # the user's input: one line, no traceback
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stlib {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything else is a bug in stlib: show where, and ask for a report
        traceback.print_exc()
        print(f"stlib {args.command}: this looks like a bug in stlib, not a problem with your input; please report it "
              "with the traceback above and the command you ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
