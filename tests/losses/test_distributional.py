"""Per-set distributional losses: known answers, per-set independence, gradients, a tiny fit."""

import pytest
import torch

from stlib.config import LOSSES, ModelConfig
from stlib.losses.distributional import SET_LOSSES, set_loss, set_mean_loss
from stlib.models.state_transition import StateTransitionModel


def sets(b=3, s=16, d=5, seed=0):
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(seed))


def test_registry_covers_config_choices():
    assert set(SET_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("kind", ["energy", "mse", "sinkhorn"])
def test_zero_for_identical_sets(kind):
    x = sets()
    loss = set_loss(x, x.clone(), kind)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(SET_LOSSES))
def test_positive_for_shifted_sets_and_grows_with_shift(kind):
    x = sets()
    near, far = set_loss(x, x + 0.5, kind), set_loss(x, x + 2.0, kind)
    assert (near > 1e-3).all() and (far > near).all()


def test_known_answers_for_a_translation():
    x, shift = sets(d=4), torch.tensor([1.0, -2.0, 0.5, 0.0])
    torch.testing.assert_close(set_loss(x, x + shift, "mse"), torch.full((3,), shift.pow(2).mean().item()))
    # debiased Sinkhorn with cost |x-y|^2/2 and a small blur: translating a set costs |shift|^2 / 2
    torch.testing.assert_close(set_loss(x, x + shift, "sinkhorn", blur=0.01),
                               torch.full((3,), shift.pow(2).sum().item() / 2), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kind", list(SET_LOSSES))
def test_sets_are_scored_independently(kind):
    x, y = sets(seed=1), sets(seed=2) + 1.0
    batched = set_loss(x, y, kind)
    single = torch.cat([set_loss(x[i:i + 1], y[i:i + 1], kind) for i in range(3)])
    # Sinkhorn's epsilon-scaling schedule uses the diameter of the whole batch: equal up to that schedule
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-3 if kind == "sinkhorn" else 1e-5)


@pytest.mark.parametrize("kind", list(SET_LOSSES))
def test_gradient_flows(kind):
    pred = sets().requires_grad_(True)
    set_loss(pred, sets(seed=3), kind).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_unequal_set_sizes_allowed_for_distributions_only():
    x, y = sets(s=16), sets(s=10, seed=4)
    assert set_loss(x, y, "energy").shape == (3,)
    with pytest.raises(ValueError, match="matched"):
        set_loss(x, y, "mse")


def test_unknown_kind_lists_options():
    with pytest.raises(ValueError, match="wasserstein.*energy, sinkhorn, mse"):
        set_loss(sets(), sets(), "wasserstein")


def test_energy_loss_fits_a_tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=16, n_layers=1, n_heads=2, intermediate_size=32, embed_vocab_size=4)
    model = StateTransitionModel(cfg, input_dim=4, pert_dim=2)
    basal = torch.randn(4, 12, 4)
    pert = torch.zeros(4, 12, 2)
    pert[..., 1] = 1.0
    target = torch.randn(4, 12, 4) * 0.5 + torch.tensor([2.0, -1.0, 0.0, 1.0])  # a shifted, narrower population
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = set_loss(model(basal, pert)["pred"], target, "energy").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_set_mean_loss_reads_only_the_set_means():
    """Zero for different cells with the same mean; the squared mean gap per dim for a translated set; per set."""
    torch.manual_seed(0)
    target = torch.randn(3, 10, 4)
    shuffled = target[:, torch.randperm(10)] * 1.0
    spread = target - target.mean(1, keepdim=True)
    reshaped = target.mean(1, keepdim=True) + 3.0 * spread  # 3x the spread, same mean
    assert torch.allclose(set_mean_loss(shuffled, target), torch.zeros(3), atol=1e-12)
    assert torch.allclose(set_mean_loss(reshaped, target), torch.zeros(3), atol=1e-10)
    shift = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    loss = set_mean_loss(target[:, :7] + shift[:, None], target[:, :7])
    assert torch.allclose(loss, torch.tensor([0.0, 0.25, 2.0]), atol=1e-6)
    with pytest.raises(ValueError, match="same B and D"):
        set_mean_loss(target, target[..., :3])


def test_set_mean_weight_adds_a_logged_component():
    from stlib.config import Config, ConfigError, LossConfig
    from stlib.train.module import STLightningModule

    cfg = Config()
    cfg.loss.set_mean_weight = 2.0
    module = STLightningModule(torch.nn.Identity(), cfg)
    target = torch.randn(2, 8, 5)
    pred = target + 0.5
    losses = module.compute_losses({"target": target}, {"pred": pred}, step=0)
    assert losses["set_mean_loss"] == pytest.approx(0.25, rel=1e-5)
    assert losses["loss"] == pytest.approx(float(losses["energy"] + 2.0 * losses["set_mean_loss"]), rel=1e-5)
    with pytest.raises(ConfigError, match="loss.set_mean_weight"):
        LossConfig(set_mean_weight=-1.0)
