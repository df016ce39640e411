"""On a CUDA GPU: every variant fine-tunes in 32-true and bf16-mixed and predicts; mHC's torch path matches the CPU.

Skipped without CUDA (CI and `make test` run on CPU). The tiny study's velocity is the simulation's true one, so
scvelo need not be installed on the GPU machine. Timings on a GPU: benchmarks/bench_gpu.py.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from stlib_testing import REPO, tiny_overrides

from stlib.constants import VARIANTS as ALL_VARIANTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VARIANTS = ALL_VARIANTS[1:]  # the fine-tuned ones
PRECISIONS = ("32-true", "bf16-mixed")


def true_velocity_study(tiny_study: Path, root: Path) -> Path:
    """A copy of the tiny study whose velocity (what `stlib velocity` writes) is the simulation's truth."""
    from stlib.data.synthetic import use_true_velocity

    shutil.copytree(tiny_study / "data", root / "data")
    use_true_velocity(root / "data" / "wound_healing.h5ad")
    return root


def finetune_and_evaluate(study: Path, base: Path, variant: str, precision: str, accelerator: str) -> dict:
    """A few steps of `variant` on `accelerator`; the last training loss and the evaluated model's summary row."""
    from stlib.config import load_config
    from stlib.evaluate.metrics import evaluate_files
    from stlib.evaluate.predict import predict_run
    from stlib.evaluate.tensorboard import read_scalars
    from stlib.train.run import train

    name = f"{variant}_{precision.split('-')[0]}"
    overrides = tiny_overrides(study, name, "wound_healing.toml", 4) + [
        f"model.init_from={base}", f"training.precision={precision}", f"training.accelerator={accelerator}",
        "training.devices=1", "model.velocity_warmup_steps=2"]
    run_dir = train(load_config(REPO / "configs" / "variants" / f"{variant}.yaml", overrides), overrides)
    scalars = read_scalars(run_dir)
    pred_path, _ = predict_run(run_dir, out_dir=study / "predictions")
    summary, _ = evaluate_files([pred_path])
    row = summary[summary["model"] == name].iloc[0]
    return {"loss": float(scalars[scalars.tag == "train/loss"]["value"].iloc[-1]),
            "gene_correlation": float(row["gene_correlation"]), "emb_gene_correlation": float(row["emb_gene_correlation"])}


def mhc_outputs(device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prediction and gradients (on the CPU) of one seeded mHC model with mixing streams, in float64 on `device`."""
    from stlib.adapters.mhc import apply_mhc
    from stlib.config import MHCConfig, ModelConfig
    from stlib.models.state_transition import StateTransitionModel

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=64, n_layers=4, n_heads=4, intermediate_size=128, cell_set_len=32, use_mhc=True,
                      mhc=MHCConfig(kernel="torch"))
    model = apply_mhc(StateTransitionModel(cfg, input_dim=32, pert_dim=5), cfg.mhc).double()
    with torch.no_grad():  # off the identity start, so the streams really mix
        for name, p in model.named_parameters():
            if "hyper_connections" in name:
                p.add_(0.5 * torch.randn_like(p))
    basal = torch.randn(4, 32, 32, dtype=torch.float64)
    pert = torch.nn.functional.one_hot(torch.randint(0, 5, (4,)), 5).double()[:, None].expand(4, 32, 5).contiguous()
    model = model.to(device)
    pred = model(basal.to(device), pert.to(device))["pred"]
    pred.square().mean().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return pred.detach().cpu(), grads


@pytest.fixture(scope="module")
def gpu_study(tiny_study, tmp_path_factory) -> Path:
    return true_velocity_study(tiny_study, tmp_path_factory.mktemp("gpu_study"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_predicts_on_gpu(gpu_study, tiny_base, variant, precision):
    result = finetune_and_evaluate(gpu_study, tiny_base, variant, precision, "gpu")
    assert np.isfinite(result["loss"]), result
    assert np.isfinite(result["gene_correlation"]) and np.isfinite(result["emb_gene_correlation"]), result


def test_mhc_torch_path_gpu_equals_cpu():
    cpu_pred, cpu_grads = mhc_outputs("cpu")
    gpu_pred, gpu_grads = mhc_outputs("cuda")
    torch.testing.assert_close(gpu_pred, cpu_pred, rtol=0, atol=1e-10)
    assert cpu_grads.keys() == gpu_grads.keys() and cpu_grads
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=0, atol=1e-9, msg=name)
