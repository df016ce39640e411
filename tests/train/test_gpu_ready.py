"""What makes a GPU run efficient, checked on the CPU: TF32 matmuls, no host sync every step, pinned batches."""

from types import SimpleNamespace

import torch

from stlib.config import Config
from stlib.train.module import STLightningModule
from stlib.train.run import on_gpu, use_tensor_cores


def test_float32_matmuls_run_as_tf32_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    use_tensor_cores()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_on_a_gpu_the_loss_is_read_back_every_log_interval_and_before_each_checkpoint_only():
    cfg = Config()
    cfg.training.max_steps, cfg.training.log_every_n_steps, cfg.training.ckpt_every_n_steps = 40, 5, 0.25  # ckpt: 10
    module = STLightningModule(torch.nn.Linear(2, 2), cfg)
    checked = [s for s in range(40) if module.checks_finite(s, torch.device("cuda"))]
    assert checked == [0, 5, 9, 10, 15, 19, 20, 25, 29, 30, 35, 39]
    assert all(module.checks_finite(s, torch.device("cpu")) for s in range(40))  # free on the CPU: every step


def test_batches_are_pinned_only_when_training_on_a_gpu():
    assert on_gpu(SimpleNamespace(accelerator="gpu"))
    assert not on_gpu(SimpleNamespace(accelerator="cpu"))
    assert on_gpu(SimpleNamespace(accelerator="auto")) == torch.cuda.is_available()
