"""Training curves from a run dir's TensorBoard events, and per-model training-dynamics numbers.

Every ``events.out.tfevents.*`` file under the run dir is read (Lightning nests them as
``tensorboard/version_N/``; a resumed run adds files), each with TensorBoard's own ``EventAccumulator``.
When a resumed run logs a (tag, step) again, the newest value (largest wall time) wins.

Gradient-norm *spikes* (``grad_spikes``): a logged grad norm g_t is a spike when
g_t > m_t + max(k · MAD_t, min_rel · m_t), where m_t and MAD_t are the median and the median absolute
deviation of the previous ``window`` logged values (the current one excluded; no spikes are called
before ``min_periods`` values). The ``min_rel`` floor stops a perfectly flat history (MAD = 0) from
turning every small rise into a spike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from stlib.errors import listing
from stlib.evaluate.layout import EvalError

TRAINABLE_FILE = "trainable_params.json"  # {"trainable": N, "total": M, "fraction": f}
SCALAR_COLUMNS = ["step", "tag", "value", "wall_time"]
TRAIN_LOSS, VAL_LOSS, GRAD_NORM = "train/loss", "val/loss", "train/grad_norm"
CELLS_PER_SEC = "perf/cells_per_sec"
AMAX_TAGS = {
    "mhc_amax_gain_forward_max": "mhc/amax_gain_forward",
    "mhc_amax_gain_backward_max": "mhc/amax_gain_backward",
}
_TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text(tag) stores tag + this


def event_files(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run dir {run_dir} does not exist")
    return sorted(run_dir.rglob("events.out.tfevents.*"))


def _accumulators(run_dir: str | Path):
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        yield acc


def read_scalars(run_dir: str | Path) -> pd.DataFrame:
    """All scalars under run_dir as a long table [step, tag, value, wall_time], one row per (tag, step)."""
    records = [
        (ev.step, tag, ev.value, ev.wall_time)
        for acc in _accumulators(run_dir)
        for tag in acc.Tags()["scalars"]
        for ev in acc.Scalars(tag)
    ]
    df = pd.DataFrame(records, columns=SCALAR_COLUMNS)
    df = df.sort_values("wall_time", kind="stable").drop_duplicates(["tag", "step"], keep="last")
    return df.sort_values(["tag", "step"]).reset_index(drop=True)


def read_text(run_dir: str | Path, tag: str) -> pd.DataFrame:
    """Text summaries of one tag (``add_text`` name, with or without "/text_summary"): [step, text, wall_time]."""
    full = tag if tag.endswith(_TEXT_SUFFIX) else tag + _TEXT_SUFFIX
    records, seen = [], set()
    for acc in _accumulators(run_dir):
        tags = acc.Tags()["tensors"]
        seen.update(tags)
        if full in tags:
            for ev in acc.Tensors(full):
                value = tensor_util.make_ndarray(ev.tensor_proto).ravel()
                text = "\n".join(v.decode() if isinstance(v, bytes) else str(v) for v in value)
                records.append((ev.step, text, ev.wall_time))
    if not records:
        raise EvalError(
            f"no text tag {tag!r} under {run_dir}; text tags: {listing(t.removesuffix(_TEXT_SUFFIX) for t in seen)}"
        )
    df = pd.DataFrame(records, columns=["step", "text", "wall_time"]).sort_values("wall_time", kind="stable")
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def series(scalars: pd.DataFrame, tag: str) -> pd.DataFrame:
    """[step, value, wall_time] of one tag, sorted by step (empty when the tag was never logged)."""
    return scalars.loc[scalars["tag"] == tag, ["step", "value", "wall_time"]].sort_values("step").reset_index(drop=True)


def grad_spikes(values, window: int = 50, k: float = 5.0, min_rel: float = 0.1, min_periods: int = 10) -> np.ndarray:
    """Boolean mask of spikes in a grad-norm series (see the module docstring for the rule)."""
    s = pd.Series(np.asarray(values, dtype=np.float64))
    past = s.shift(1).rolling(window, min_periods=min(min_periods, window))
    median = past.median()
    mad = past.apply(lambda w: np.nanmedian(np.abs(w - np.nanmedian(w))), raw=True)
    threshold = median + np.maximum(k * mad, min_rel * median.abs())
    return (s > threshold).fillna(False).to_numpy(dtype=bool)


def read_trainable(run_dir: str | Path) -> dict:
    """The run's trainable_params.json ({} when absent)."""
    path = Path(run_dir) / TRAINABLE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _sec_per_step(s: pd.DataFrame) -> float:
    """Median wall seconds per step between consecutive logged points (robust to resume gaps)."""
    if len(s) < 2:
        return float("nan")
    dt, ds = np.diff(s["wall_time"].to_numpy()), np.diff(s["step"].to_numpy())
    ok = (ds > 0) & (dt > 0)
    return float(np.median(dt[ok] / ds[ok])) if ok.any() else float("nan")


def _stat(s: pd.DataFrame, fn) -> float:
    return float(fn(s["value"].to_numpy())) if len(s) else float("nan")


def dynamics_from_scalars(scalars: pd.DataFrame, trainable: dict | None = None, window: int = 50) -> dict:
    """Training-dynamics numbers of one run from its :func:`read_scalars` table."""
    train, val, grad = series(scalars, TRAIN_LOSS), series(scalars, VAL_LOSS), series(scalars, GRAD_NORM)
    tail = train.iloc[-max(1, len(train) // 10) :] if len(train) else train
    trainable = trainable or {}
    out = {
        "steps": int(scalars["step"].max()) if len(scalars) else 0,
        "final_train_loss": _stat(train, lambda v: v[-1]),
        "best_train_loss": _stat(train, np.min),
        "train_loss_tail_mean": _stat(tail, np.mean),  # mean over the last 10% of logged points
        "final_val_loss": _stat(val, lambda v: v[-1]),
        "best_val_loss": _stat(val, np.min),
        "best_val_step": int(val.loc[val["value"].idxmin(), "step"]) if len(val) else -1,
        "grad_norm_mean": _stat(grad, np.mean),
        "grad_norm_std": _stat(grad, np.std),
        "grad_norm_spikes": int(grad_spikes(grad["value"], window=window).sum()) if len(grad) else 0,
        "sec_per_step": _sec_per_step(train),
        "cells_per_sec": _stat(series(scalars, CELLS_PER_SEC), np.mean),
        "trainable_params": trainable.get("trainable", np.nan),
        "total_params": trainable.get("total", np.nan),
        "trainable_pct": 100.0 * trainable["fraction"] if "fraction" in trainable else np.nan,
        # without the gene decoder readout (trained in full beside the adapters): the adapters' own share
        "trainable_pct_without_decoder": 100.0 * trainable.get("fraction_without_decoder", trainable.get(
            "fraction", np.nan)),
    }
    for column, tag in AMAX_TAGS.items():
        out[column] = _stat(series(scalars, tag), np.max)
    return out


def training_dynamics(runs: dict[str, str | Path], window: int = 50) -> pd.DataFrame:
    """One row per model: final/best losses, grad-norm mean/std/spikes, speed, trainable share."""
    rows = []
    for name, run_dir in runs.items():
        scalars = read_scalars(run_dir)
        rows.append({"model": name, **dynamics_from_scalars(scalars, read_trainable(run_dir), window=window)})
    return pd.DataFrame(rows)
