"""Velocity alignment loss: known answers, weighting, masking, gradients, warm-up schedule."""

import pytest
import torch

from stlib.losses.velocity import velocity_alignment_loss, velocity_weight

B, S, D = 3, 5, 8


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    basal = torch.randn(B, S, D, generator=g)
    velocity = torch.randn(B, S, D, generator=g)
    confidence = torch.rand(B, S, generator=g)
    return basal, velocity, confidence


def test_zero_when_shift_parallel_to_velocity(tensors):
    basal, velocity, confidence = tensors
    scale = torch.rand(B, S, 1) * 3 + 0.1  # any positive length per cell
    loss = velocity_alignment_loss(basal + scale * velocity, basal, velocity, confidence)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_two_when_opposite(tensors):
    basal, velocity, confidence = tensors
    loss = velocity_alignment_loss(basal - 2 * velocity, basal, velocity, confidence)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)


def test_range_and_orthogonal_is_one(tensors):
    basal, velocity, confidence = tensors
    pred = basal + torch.randn(B, S, D)
    assert 0.0 <= velocity_alignment_loss(pred, basal, velocity, confidence).item() <= 2.0
    v = torch.zeros(1, 2, 4)
    v[..., 0] = 1.0
    shift = torch.zeros(1, 2, 4)
    shift[..., 1] = 5.0
    assert velocity_alignment_loss(shift, torch.zeros_like(shift), v, torch.ones(1, 2)).item() == pytest.approx(1.0)


def test_confidence_weighting_known_answer():
    basal = torch.zeros(1, 2, 2)
    velocity = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    pred = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # cell 0 aligned (0), cell 1 opposite (2)
    conf = torch.tensor([[0.9, 0.3]])
    weighted = velocity_alignment_loss(pred, basal, velocity, conf, beta=1.0)
    assert weighted.item() == pytest.approx(2 * 0.3 / 1.2)
    squared = velocity_alignment_loss(pred, basal, velocity, conf, beta=2.0)
    assert squared.item() == pytest.approx(2 * 0.09 / 0.9)
    equal = velocity_alignment_loss(pred, basal, velocity, conf, beta=0.0)
    assert equal.item() == pytest.approx(1.0)


def test_beta_zero_weights_all_cells_equally(tensors):
    basal, velocity, confidence = tensors
    pred = basal + torch.randn(B, S, D)
    confidence[0, 0] = 0.0  # even a zero-confidence cell counts when beta = 0
    unweighted = (1 - torch.cosine_similarity(pred - basal, velocity, dim=-1)).mean()
    loss = velocity_alignment_loss(pred, basal, velocity, confidence, beta=0.0)
    assert loss.item() == pytest.approx(unweighted.item(), rel=1e-6)


def test_zero_velocity_and_zero_weight_cells_contribute_nothing(tensors):
    basal, velocity, confidence = tensors
    pred = basal + velocity  # aligned everywhere: loss 0
    pred[0, 0] = basal[0, 0] - velocity[0, 0]  # opposite, but its velocity is removed below
    pred[1, 1] = basal[1, 1] - velocity[1, 1]  # opposite, but its confidence is 0
    velocity = velocity.clone()
    velocity[0, 0] = 0.0
    confidence = confidence.clone()
    confidence[1, 1] = 0.0
    assert velocity_alignment_loss(pred, basal, velocity, confidence).item() == pytest.approx(0.0, abs=1e-6)


def test_skipped_sets_contribute_nothing(tensors):
    basal, velocity, confidence = tensors
    pred = (basal + torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    skip = torch.tensor([False, True, False])
    loss = velocity_alignment_loss(pred, basal, velocity, confidence, skip_sets=skip)
    kept = velocity_alignment_loss(pred[~skip], basal[~skip], velocity[~skip], confidence[~skip])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(pred.grad[1]) == 0 and torch.count_nonzero(pred.grad[0]) > 0
    with pytest.raises(ValueError, match="skip_sets"):
        velocity_alignment_loss(pred, basal, velocity, confidence, skip_sets=torch.tensor([True]))


def test_no_usable_cell_gives_zero_with_finite_gradient(tensors):
    basal, velocity, _ = tensors
    pred = basal.clone().requires_grad_(True)  # zero shift as well
    loss = velocity_alignment_loss(pred, basal, torch.zeros_like(velocity), torch.ones(B, S))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


def test_gradient_finite_at_zero_shift(tensors):
    basal, velocity, confidence = tensors
    pred = basal.clone().requires_grad_(True)
    velocity_alignment_loss(pred, basal, velocity, confidence).backward()
    assert torch.isfinite(pred.grad).all()


TINY_MODULE = ["model.hidden_dim=16", "model.n_layers=1", "model.n_heads=2", "model.intermediate_size=32",
               f"model.cell_set_len={S}", "model.embed_vocab_size=4", "model.velocity_warmup_steps=2"]


def _loss_and_grads(model, overrides, batch, step):
    """The LightningModule's training loss for one batch and the gradient it gives every trainable weight."""
    from stlib.config import load_config
    from stlib.train.module import STLightningModule

    module = STLightningModule(model, load_config(None, TINY_MODULE + overrides))
    model.zero_grad()
    loss = module.compute_losses(batch, module(batch), step=step)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("step", [1, 10])  # during and after the velocity warm-up
def test_lambda_zero_gives_the_loss_and_gradients_of_velocity_off(tensors, step):
    from stlib.config import load_config
    from stlib.models.state_transition import StateTransitionModel

    basal, velocity, confidence = tensors
    torch.manual_seed(0)
    model = StateTransitionModel(load_config(None, TINY_MODULE).model, input_dim=D, pert_dim=2)
    pert = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 2).float()[:, None].expand(B, S, 2)
    batch = {"basal": basal, "pert": pert, "target": basal + 1.0, "basal_velocity": velocity,
             "basal_velocity_confidence": confidence}
    off_loss, off_grads = _loss_and_grads(model, ["model.use_velocity_alignment=false"], batch, step)
    on = ["model.use_velocity_alignment=true"]
    zero_loss, zero_grads = _loss_and_grads(model, [*on, "model.velocity_lambda=0"], batch, step)
    torch.testing.assert_close(zero_loss, off_loss, rtol=0, atol=0)
    assert zero_grads.keys() == off_grads.keys() and len(off_grads) > 10
    for name, grad in off_grads.items():
        torch.testing.assert_close(zero_grads[name], grad, rtol=0, atol=0, msg=name)
    # the check can see the velocity term: with a weight it changes the loss and the gradients
    weighted_loss, weighted_grads = _loss_and_grads(model, [*on, "model.velocity_lambda=0.5"], batch, step)
    assert weighted_loss > off_loss
    assert any(not torch.allclose(weighted_grads[n], g) for n, g in off_grads.items())


def test_descent_aligns_the_shift(tensors):
    basal, velocity, confidence = tensors
    pred = (basal + torch.randn(B, S, D)).requires_grad_(True)
    opt = torch.optim.Adam([pred], lr=0.05)
    start = velocity_alignment_loss(pred, basal, velocity, confidence).item()
    for _ in range(100):
        opt.zero_grad()
        loss = velocity_alignment_loss(pred, basal, velocity, confidence)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start


def test_shape_errors_are_clear(tensors):
    basal, velocity, confidence = tensors
    with pytest.raises(ValueError, match="same shape"):
        velocity_alignment_loss(basal[:, :2], basal, velocity, confidence)
    with pytest.raises(ValueError, match="confidence must have shape"):
        velocity_alignment_loss(basal, basal, velocity, confidence[:, :2])


@pytest.mark.parametrize(
    "step, lam, warmup, expected",
    [
        (0, 0.1, 1000, 0.0),
        (250, 0.1, 1000, 0.025),
        (1000, 0.1, 1000, 0.1),
        (5000, 0.1, 1000, 0.1),
        (0, 0.3, 0, 0.3),
        (7, 0.0, 10, 0.0),
    ],
)
def test_warmup_schedule(step, lam, warmup, expected):
    assert velocity_weight(step, lam=lam, warmup_steps=warmup) == pytest.approx(expected)
