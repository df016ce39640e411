"""The State Transition (ST) model: a set of control cells + a perturbation -> the perturbed set.

Arc Institute's *State* (Adduri et al., bioRxiv 2025.06.26.661135) encodes each control ("basal") cell and
its perturbation into one hidden vector (two MLPs, summed), lets the cells of a set attend to each other
in a bidirectional LLaMA transformer (no positions: a set has no order), and projects back to the input
space. With ``predict_residual`` the basal encoding is added back before the projection, so the network
learns a shift. An optional gene decoder maps predicted cells to expression.

Attribute names equal State's checkpoint prefixes (``pert_encoder``, ``basal_encoder``,
``transformer_backbone``, ``project_out``, ``gene_decoder``, ``batch_encoder``, ``confidence_token``,
``final_down_then_up``) so a State run's ``state_dict`` loads strictly (see ``state_checkpoint.py``); the
layer layouts (Linear/activation/dropout order, LayerNorm+GELU decoder ending in ReLU) were read off a
State checkpoint and checked numerically against State's own forward pass.

Shapes: B sets, S cells per set, D input/output width (embedding or genes the model works in),
P perturbation encoding width, H hidden width, G decoded genes.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from stlib.config import DecoderConfig, ModelConfig
from stlib.errors import ConfigError
from stlib.linear import ridge_solve
from stlib.models.backbone import SetTransformer

ACTIVATIONS = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "leakyrelu": nn.LeakyReLU,
}


def activation_class(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ConfigError(f"model.activation={name!r} is not one of {', '.join(ACTIVATIONS)}") from None


def build_mlp(in_dim: int, out_dim: int, hidden_dim: int, n_linear: int, dropout: float, activation: str) -> nn.Sequential:
    """`n_linear` Linear layers with activation + dropout between them (State's encoder layout; 1 = one Linear)."""
    if n_linear < 1:
        raise ValueError(f"an encoder/decoder MLP needs >= 1 Linear layer, got {n_linear}")
    act = activation_class(activation)
    dims = [in_dim] + [hidden_dim] * (n_linear - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < n_linear - 1:
            layers += [act(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class GeneDecoder(nn.Module):
    """Predicted cells -> expression: (Linear, LayerNorm, GELU, Dropout) per hidden width, Linear, ReLU/Softplus.

    State ends with ReLU whatever its ``softplus`` key says; ``softplus=True`` here is stlib's smoother choice
    for models trained from scratch (``load_state_run`` sets it False).

    ``skip=True`` adds a linear readout beside the MLP (buffers ``skip_weight`` [G, D], ``skip_bias`` [G]), fitted
    once by least squares on real cells (:meth:`fit_skip`); the MLP then learns only what is not linear. Why: a
    short fine-tune leaves the MLP's slope poor, and the slope is what turns a predicted *shift* into genes (see
    ``decoder.skip``). The output is then ReLU: a least-squares readout is already on the expression scale.
    """

    def __init__(self, latent_dim: int, gene_dim: int, hidden: list[int], dropout: float, softplus: bool,
                 skip: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        d = latent_dim
        for width in hidden:
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
            d = width
        layers += [nn.Linear(d, gene_dim), nn.Softplus() if softplus and not skip else nn.ReLU()]
        self.decoder = nn.Sequential(*layers)
        self.gene_dim = gene_dim
        self.skip = skip
        if skip:
            self.register_buffer("skip_weight", torch.zeros(gene_dim, latent_dim))
            self.register_buffer("skip_bias", torch.zeros(gene_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., G]."""
        if not self.skip:
            return self.decoder(x)
        mlp, out = self.decoder[:-1], self.decoder[-1]
        return out(mlp(x) + nn.functional.linear(x, self.skip_weight, self.skip_bias))

    @torch.no_grad()
    def start_at(self, gene_mean: torch.Tensor) -> None:
        """Set the output bias so a new decoder starts near the mean expression instead of ~0.69 (softplus(0)).

        Without it most of a short fine-tune goes into learning each gene's level, not the cells' differences.
        """
        last, act = self.decoder[-2], self.decoder[-1]
        mean = torch.as_tensor(gene_mean, dtype=last.bias.dtype, device=last.bias.device).clamp_min(1e-4)
        if mean.shape != last.bias.shape:
            raise ValueError(f"gene_mean has shape {tuple(mean.shape)}, expected ({self.gene_dim},)")
        last.bias.copy_(mean + torch.log(-torch.expm1(-mean)) if isinstance(act, nn.Softplus) else mean)

    @torch.no_grad()
    def fit_skip(self, gram: torch.Tensor, cross: torch.Tensor, n_cells: int, ridge: float) -> None:
        """Set the linear readout to the ridge solution and the MLP's last layer to zero (it starts as that readout).

        ``gram`` = [E 1]^T [E 1] ([D+1, D+1]) and ``cross`` = [E 1]^T X ([D+1, G]) over ``n_cells`` cells with
        embedding E and expression X (:func:`stlib.linear.normal_equations`); the penalty is ``ridge * n_cells``
        on the weights, not the bias (:func:`stlib.linear.ridge_solve`).
        """
        if not self.skip:
            raise ValueError("fit_skip needs a decoder built with skip=True (decoder.skip)")
        d = self.skip_weight.shape[1]
        if gram.shape != (d + 1, d + 1) or cross.shape != (d + 1, self.gene_dim):
            raise ValueError(f"expected gram [{d + 1}, {d + 1}] and cross [{d + 1}, {self.gene_dim}], got "
                             f"{tuple(gram.shape)} and {tuple(cross.shape)}")
        weight, bias = ridge_solve(np.asarray(gram, dtype=np.float64), np.asarray(cross, dtype=np.float64), n_cells,
                                   ridge)  # [D, G], [G]
        self.skip_weight.copy_(torch.from_numpy(weight.T).to(self.skip_weight))
        self.skip_bias.copy_(torch.from_numpy(bias).to(self.skip_bias))
        last = self.decoder[-2]
        last.weight.zero_()
        last.bias.zero_()


class VelocityDisplacement(nn.Module):
    """Moves each predicted cell along its basal cell's RNA velocity by a learned gain per perturbation.

    Why: on a cell type never seen in training the network's shift is an interpolation of the training types'
    shifts, while a cell's own velocity points along its own trajectory, which is where a perturbation that
    speeds the trajectory up moves it. The gains start at zero (the model's outputs are unchanged) and are read
    from the perturbation encoding ([..., P] @ gain), so a control's gain is learned like any other.
    """

    def __init__(self, pert_dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(pert_dim))

    def forward(self, pert: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """pert [B, S, P], velocity [B, S, D] -> displacement [B, S, D]."""
        return (pert.to(self.gain.dtype) @ self.gain).unsqueeze(-1) * velocity

    @torch.no_grad()
    def extend(self, new_pert_dim: int) -> None:
        """New perturbation columns get gain 0."""
        grown = torch.zeros(new_pert_dim, dtype=self.gain.dtype, device=self.gain.device)
        grown[: self.gain.numel()] = self.gain
        self.gain = nn.Parameter(grown, requires_grad=self.gain.requires_grad)


class ConfidenceToken(nn.Module):
    """A learned token appended to each set; its output predicts the set's loss (State's confidence head)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.confidence_token = nn.Parameter(torch.randn(1, 1, hidden))
        h2, h4 = hidden // 2, hidden // 4
        self.confidence_projection = nn.Sequential(
            nn.Linear(hidden, h2), nn.LayerNorm(h2), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(h2, h4), nn.LayerNorm(h4), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(h4, 1), nn.ReLU(),
        )

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S+1, H]."""
        return torch.cat([x, self.confidence_token.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S+1, H] -> cells [B, S, H], predicted loss [B]."""
        return h[:, :-1], self.confidence_projection(h[:, -1]).squeeze(-1)


class StateTransitionModel(nn.Module):
    """Set-to-set perturbation model; every option comes from :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig, input_dim: int, pert_dim: int, gene_dim: int | None = None,
                 n_batches: int | None = None, n_times: int | None = None, decoder: DecoderConfig | None = None,
                 velocity_displacement: bool = False):
        super().__init__()
        self.cfg, self.input_dim, self.pert_dim, self.gene_dim = cfg, input_dim, pert_dim, gene_dim
        h = cfg.hidden_dim
        self.pert_encoder = build_mlp(pert_dim, h, h, cfg.n_encoder_layers, cfg.dropout, cfg.activation)
        self.basal_encoder = build_mlp(input_dim, h, h, cfg.n_encoder_layers, cfg.dropout, cfg.activation)
        self.transformer_backbone = SetTransformer(cfg)
        self.project_out = build_mlp(h, input_dim, h, cfg.n_decoder_layers, cfg.dropout, cfg.activation)
        if cfg.predict_residual and cfg.residual_space == "input":
            last = self.project_out[-1] if isinstance(self.project_out, nn.Sequential) else self.project_out
            nn.init.zeros_(last.weight)  # a new model starts as the identity: predicted = basal
            nn.init.zeros_(last.bias)
        self.final_down_then_up = None
        if cfg.final_down_then_up:
            if input_dim < 8:
                raise ConfigError(f"model.final_down_then_up needs input_dim >= 8 (it squeezes D to D/8), got {input_dim}")
            self.final_down_then_up = nn.Sequential(
                nn.Linear(input_dim, input_dim // 8), nn.GELU(), nn.Linear(input_dim // 8, input_dim)
            )
        self.gene_decoder = None
        if gene_dim is not None:
            self.set_gene_decoder(gene_dim, decoder or DecoderConfig())
        self.batch_encoder = None
        if cfg.batch_encoder:
            if not n_batches:
                raise ConfigError("model.batch_encoder=true needs the number of batches (n_batches); "
                                 "set data.batch_col to a column with batches, or model.batch_encoder=false")
            self.batch_encoder = nn.Embedding(n_batches, h)
        self.confidence_token = ConfidenceToken(h, cfg.dropout) if cfg.confidence_token else None
        self.time_encoder = None
        if cfg.time_encoder:
            self.add_time_encoder(n_times)
        self.velocity_displacement = None
        if velocity_displacement:
            self.add_velocity_displacement()

    def set_dropout(self, p: float) -> int:
        """Dropout rate of the encoders, project_out and confidence head (model.dropout) on a built model: a
        fine-tune's own choice, whatever the base was trained with. Returns how many dropout layers it set (none
        when those MLPs are single Linear layers)."""
        modules = [self.pert_encoder, self.basal_encoder, self.project_out, self.confidence_token]
        layers = [m for module in modules if module is not None for m in module.modules() if isinstance(m, nn.Dropout)]
        for layer in layers:
            layer.p = p
        return len(layers)

    def add_velocity_displacement(self) -> None:
        """Gains per perturbation for moving cells along their RNA velocity; zero, so outputs are unchanged."""
        ref = self.pert_encoder[0].weight
        self.velocity_displacement = VelocityDisplacement(self.pert_dim).to(ref.device, ref.dtype)

    def add_time_encoder(self, n_times: int | None) -> None:
        """A learned embedding per time point, added to every cell; zero-initialised so outputs are unchanged."""
        if not n_times:
            raise ConfigError("model.time_encoder=true needs time points: set data.time_col to a column with them "
                             "(e.g. day), or model.time_encoder=false")
        ref = self.pert_encoder[0].weight
        self.time_encoder = nn.Embedding(n_times, self.cfg.hidden_dim, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.time_encoder.weight)

    def set_gene_decoder(self, gene_dim: int | None, cfg: DecoderConfig | None = None) -> None:
        """A fresh gene decoder for ``gene_dim`` genes (None removes it): fine-tuning into another output space."""
        self.gene_dim = gene_dim
        if gene_dim is None:
            self.gene_decoder = None
            return
        cfg = cfg or DecoderConfig()
        ref = self.pert_encoder[0].weight
        self.gene_decoder = GeneDecoder(self.input_dim, gene_dim, list(cfg.hidden), cfg.dropout, cfg.softplus,
                                        cfg.skip).to(ref.device, ref.dtype)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, basal: torch.Tensor, pert: torch.Tensor, batch_index: torch.Tensor | None = None,
                time_index: torch.Tensor | None = None, decode: bool = True,
                velocity: torch.Tensor | None = None) -> dict:
        """basal [B, S, D], pert [B, S, P], batch_index [B, S] (long), time_index [B] (long: each set's time
        point), velocity [B, S, D] (the basal cells' RNA velocity; models with velocity.displacement)
        -> dict(pred, genes, confidence, hidden); genes is None without a decoder or with decode=False."""
        if basal.dim() != 3 or pert.shape[:2] != basal.shape[:2]:
            raise ValueError(f"expected basal [B, S, D] and pert [B, S, P] with the same B, S; "
                             f"got {tuple(basal.shape)} and {tuple(pert.shape)}")
        basal_hidden = self.basal_encoder(basal)  # [B, S, H]
        x = self.pert_encoder(pert) + basal_hidden
        if self.batch_encoder is not None:
            if batch_index is None:
                raise ValueError("this model has a batch encoder: pass batch_index [B, S]")
            x = x + self.batch_encoder(batch_index.long())
        if self.time_encoder is not None:
            if time_index is None:
                raise ValueError("this model has a time encoder: pass time_index [B] (each set's time point)")
            x = x + self.time_encoder(time_index.long()).unsqueeze(1)
        if self.confidence_token is not None:
            x = self.confidence_token.append(x)
        h = self.transformer_backbone(x)
        confidence = None
        if self.confidence_token is not None:
            h, confidence = self.confidence_token.split(h)

        if self.cfg.predict_residual and self.final_down_then_up is not None:
            pred = self.final_down_then_up(self.project_out(h) + basal)  # State's output_space=all variant
        elif self.cfg.predict_residual and self.cfg.residual_space == "input":
            pred = basal + self.project_out(h)  # the shift is added to the cell itself: identity extrapolates
        elif self.cfg.predict_residual:
            pred = self.project_out(h + basal_hidden)  # State: the shift is learned in hidden space
        else:
            pred = self.project_out(h)
        if self.velocity_displacement is not None:
            if velocity is None or velocity.shape != basal.shape:
                raise ValueError("this model moves cells along their RNA velocity (velocity.displacement): "
                                 f"pass velocity with the basal cells' shape {tuple(basal.shape)}, got "
                                 f"{None if velocity is None else tuple(velocity.shape)}")
            pred = pred + self.velocity_displacement(pert, velocity.to(pred.dtype))
        if self.cfg.output_relu:
            pred = torch.relu(pred)
        genes = self.gene_decoder(pred) if self.gene_decoder is not None and decode else None
        return {"pred": pred, "genes": genes, "confidence": confidence, "hidden": h}

    @torch.no_grad()
    def predict_sets(self, basal: torch.Tensor, pert: torch.Tensor, batch_index: torch.Tensor | None = None,
                     time_index: torch.Tensor | None = None, velocity: torch.Tensor | None = None) -> dict:
        """Inference: eval mode (no dropout), no autograd; the previous train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(basal, pert, batch_index, time_index, velocity=velocity)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------ surgery
    def extend_perturbations(self, new_pert_dim: int, new_columns: torch.Tensor | None = None) -> None:
        """Grow the perturbation encoder's input from pert_dim to new_pert_dim columns, keeping the old ones.

        Fine-tuning meets perturbations the base never saw. A one-hot for an old perturbation is zero in the
        new columns, so old outputs stay identical. New columns default to the mean of the old ones: a
        "generic perturbation" the fine-tune starts from instead of random noise. ``new_columns`` [H_out, n_new]
        sets them explicitly. Call before wrapping the model with adapters (LoRA, modules_to_save).
        """
        first = self.pert_encoder[0]
        if not isinstance(first, nn.Linear):
            raise TypeError(f"pert_encoder[0] is {type(first).__name__}, expected nn.Linear (apply adapters after "
                            "extend_perturbations)")
        old = first.in_features
        if new_pert_dim < old:
            raise ValueError(f"new_pert_dim={new_pert_dim} is smaller than the current pert_dim={old}")
        if new_pert_dim == old:
            return
        n_new = new_pert_dim - old
        w = first.weight.detach()
        if new_columns is None:
            new_columns = w.mean(dim=1, keepdim=True).expand(-1, n_new)
        if tuple(new_columns.shape) != (w.shape[0], n_new):
            raise ValueError(f"new_columns must have shape {(w.shape[0], n_new)} ([out_features, n_new]), "
                             f"got {tuple(new_columns.shape)}")
        grown = nn.Linear(new_pert_dim, first.out_features, bias=first.bias is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            grown.weight.copy_(torch.cat([w, new_columns.to(w)], dim=1))
            if first.bias is not None:
                grown.bias.copy_(first.bias)
        grown.weight.requires_grad_(first.weight.requires_grad)
        if first.bias is not None:
            grown.bias.requires_grad_(first.bias.requires_grad)
        self.pert_encoder[0] = grown
        if self.velocity_displacement is not None:
            self.velocity_displacement.extend(new_pert_dim)
        self.pert_dim = new_pert_dim
