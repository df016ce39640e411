"""Callbacks: plain-line progress that reads well through `tee`, in a log file and in a notebook.

The tqdm bar redraws one line with carriage returns, which a log file or a notebook cell shows as one
unreadable line; this prints a short line every few percent of the run instead.
"""

from __future__ import annotations

import time

import lightning as L


class LineProgress(L.Callback):
    def __init__(self, every_n_steps: int | None = None, n_lines: int = 20):
        self.every = every_n_steps
        self.n_lines = n_lines
        self._start = 0.0
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step
        if self.every is None:
            self.every = max(1, trainer.max_steps // self.n_lines)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        metrics = trainer.callback_metrics
        elapsed = time.perf_counter() - self._start
        rate = (step - self._start_step) / max(elapsed, 1e-9)
        parts = [f"step {step}/{trainer.max_steps}"]
        for key in ("train/loss", "val/loss", "train/grad_norm"):
            if key in metrics:
                parts.append(f"{key}={float(metrics[key]):.4f}")
        parts.append(f"{rate:.1f} steps/s")
        remaining = (trainer.max_steps - step) / max(rate, 1e-9)
        parts.append(f"eta {remaining:.0f}s")
        print("[stlib] " + "  ".join(parts), flush=True)
