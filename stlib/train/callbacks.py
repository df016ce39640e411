"""Callbacks: plain-line progress that reads well through `tee`, a clean stop on Ctrl-C, weight averaging.

The tqdm bar redraws one line with carriage returns, which a log file or a notebook cell shows as one
unreadable line; LineProgress prints a short line every few percent of the run instead.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch


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
        if not trainer.is_global_zero or (step % self.every and step != trainer.max_steps):
            return
        metrics = trainer.callback_metrics
        elapsed = time.perf_counter() - self._start
        rate = (step - self._start_step) / max(elapsed, 1e-9)
        parts = [f"step {step}/{trainer.max_steps}"]
        for key in ("train/loss", "val/loss", "train/grad_norm"):
            if key in metrics:
                parts.append(f"{key}={float(metrics[key]):.4f}")
        parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/step")  # slow runs: no 0.0
        remaining = (trainer.max_steps - step) / max(rate, 1e-9)
        parts.append(f"eta {remaining:.0f}s")
        print("[stlib] " + "  ".join(parts), flush=True)


class GracefulStop(L.Callback):
    """SIGINT / SIGTERM (Ctrl-C, a notebook's interrupt, `kill`): finish the step, write ``last.ckpt``, stop.

    Lightning's own handling raises out of the step at once, so the progress since the last step checkpoint is
    lost and the run is marked failed; here the run stops between steps, resumable from exactly where it stopped.
    A second signal while stopping is ignored.
    """

    def __init__(self, last_checkpoint: Path):
        self.last_checkpoint = Path(last_checkpoint)
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _request(self, signum, frame) -> None:
        if self.requested is None:
            print(f"[stlib] {signal.Signals(signum).name}: stopping after this step; last.ckpt keeps the run", flush=True)
        self.requested = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # after Lightning's handlers: ours win
            self._previous = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested is not None and not trainer.should_stop:
            trainer.save_checkpoint(self.last_checkpoint)
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class WeightAverage(L.Callback):
    """Running mean of the trainable weights over every step from ``start_step`` on; copied into the model when
    training ends, so final.ckpt (saved after fit) holds the average (training.average_weights_from).

    The mean travels in every checkpoint (Lightning saves callback state), so a resumed run averages exactly the
    steps an unbroken one does. Frozen weights never change and are not averaged.
    """

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

    @staticmethod
    def _trainable(pl_module) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.start_step:
            return
        params = self._trainable(pl_module)
        if self.mean is None:
            self.mean = [p.detach().clone() for p in params]
            self.count = 1
            return
        if self.mean[0].device != params[0].device:  # resumed from a checkpoint: the mean was loaded on CPU
            self.mean = [m.to(p.device) for m, p in zip(self.mean, params)]
        self.count += 1
        for mean, p in zip(self.mean, params):
            mean.add_(p.detach() - mean, alpha=1.0 / self.count)

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        if self.mean is None:
            return
        for mean, p in zip(self.mean, self._trainable(pl_module)):
            p.copy_(mean)
        if trainer.is_global_zero:
            print(f"[stlib] final weights: the average of the last {self.count} steps "
                  "(training.average_weights_from)", flush=True)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": [m.cpu() for m in self.mean] if self.mean is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.count = int(state_dict["count"])
        mean = state_dict["mean"]
        self.mean = [m.clone() for m in mean] if mean is not None else None
