"""Typed experiment configuration: dataclasses + YAML files + dot-list overrides.

One dataclass per group (data, model, lora, mhc, training), nested in :class:`Config`. YAML files in
``configs/`` are merged onto these defaults and ``key.sub=value`` overrides go on top, so the study
plan's command lines (``training.max_steps=400 model.hidden_dim=256``) work as written. A key that
does not exist fails loudly with a suggestion, before any data is read.

State's own spellings (``data.kwargs.embed_key``, ``model.kwargs.hidden_dim``) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

OUTPUT_SPACES = ("embedding", "gene", "all")
LOSSES = ("energy", "sinkhorn", "mse")
MHC_KERNELS = ("auto", "numba", "torch")  # as stlib.adapters.mhc.KERNELS (that module does not import config)
RESIDUAL_SPACES = ("input", "hidden")
SMALL_GROUP_POLICIES = ("replace", "error")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


@dataclass
class DataConfig:
    toml_config_path: str = "data/wound_healing.toml"  # State-style TOML: [datasets] [training] [zeroshot] [fewshot]
    embed_key: str = "X_state"  # obsm key of the cell embedding the model works in, or "X"
    pert_col: str = "condition"  # obs column naming each cell's perturbation
    control_pert: str = "Sham"  # value of pert_col for control (basal) cells
    cell_type_key: str = "cell_types_simple_short"  # obs column; a constant column works for one cell line
    batch_col: str | None = "mouse_id"  # obs column for batches (mice, plates); null = off
    time_col: str | None = "day"  # obs column with time points, kept in predictions; null = off
    output_space: str = "embedding"  # embedding | gene | all: "gene"/"all" add a gene decoder
    gene_layer: str | None = "log1p"  # layer with log-normalised expression for the decoder; null = X
    velocity_key: str | None = None  # obsm key of velocity in the model's space; null = velocity_<embed_key>
    velocity_confidence_key: str = "velocity_confidence"  # obs column weighting the velocity loss
    perturbation_features_file: str | None = None  # .pt dict {name: vector}; null = one-hot
    small_group: str = "replace"  # group smaller than cell_set_len: "replace" samples with replacement, "error"
    sets_per_group: int = 8  # cell sets drawn per (cell type, perturbation, batch) group per validation pass
    num_workers: int = 0  # DataLoader workers; 0 is fastest for in-memory data
    seed: int = 0  # seed for the split sampler

    def __post_init__(self):
        _check_choice("data.output_space", self.output_space, OUTPUT_SPACES)
        _check_choice("data.small_group", self.small_group, SMALL_GROUP_POLICIES)

    @property
    def resolved_velocity_key(self) -> str:
        return self.velocity_key or f"velocity_{self.embed_key}"


@dataclass
class LoraConfig:
    enable: bool = False  # off = the plain model, every weight trainable
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    adapt_mlp: bool = False  # also adapt gate/up/down projections of the transformer MLP
    # trained in full beside the adapters: what a new experiment needs (its new perturbations); add
    # "project_out" / "gene_decoder" when the output space differs from the base's
    modules_to_save: list[str] = field(default_factory=lambda: ["pert_encoder"])

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1, got {self.r} (use model.lora.enable=false to turn LoRA off)")


@dataclass
class MHCConfig:
    n_streams: int = 4  # residual streams; 1 = plain residual
    sinkhorn_iters: int = 20  # cap on Sinkhorn-Knopp iterations
    sinkhorn_tol: float = 1e-6  # stop early when row and column sums are this close to 1
    alpha_init: float = 0.01  # initial gate on the dynamic (token-dependent) coefficients
    kernel: str = "auto"  # per-token stream work: auto = compiled numba loops on CPU, torch ops elsewhere; numba | torch

    def __post_init__(self):
        _check_choice("model.mhc.kernel", self.kernel, MHC_KERNELS)
        if self.n_streams < 1:
            raise ConfigError(f"model.mhc.n_streams must be >= 1, got {self.n_streams}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"model.mhc.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


@dataclass
class ModelConfig:
    hidden_dim: int = 128  # transformer width
    cell_set_len: int = 64  # cells per set ("cell sentence")
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # attention heads
    head_dim: int | None = None  # per-head width; null = hidden_dim // n_heads
    n_kv_heads: int | None = None  # key/value heads; null = n_heads
    intermediate_size: int = 512  # transformer MLP width
    n_encoder_layers: int = 1  # Linear layers in the basal/perturbation encoders (State's count); 1 = one Linear
    dropout: float = 0.0  # dropout in the encoders, project_out and confidence head (attention: attention_dropout)
    rms_norm_eps: float = 1e-6
    predict_residual: bool = True  # predict perturbed = basal + learned shift
    # where the residual lives: "input" = basal + project_out(h), so cell types never seen in training keep their
    # identity; "hidden" = State's project_out(h + basal_encoder(basal)) (State checkpoints load with it)
    residual_space: str = "input"
    batch_encoder: bool = False  # add a learned batch embedding (needs data.batch_col)
    confidence_token: bool = False  # append a token that predicts the set's loss
    # add a learned embedding of the group's time point (data.time_col, e.g. day) to every cell: the effect of a
    # perturbation can then differ by day. Zero at start (a base without it keeps its outputs); needs data.time_col
    time_encoder: bool = False
    decoder_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 512])  # gene decoder MLP widths
    decoder_loss_weight: float = 1.0  # weight of the decoder's per-cell MSE (real embedding -> real expression)
    # -- State architecture details (the model owner's fields; load_state_run fills them from a State run)
    n_decoder_layers: int = 1  # Linear layers in project_out (State: n_decoder_layers); 1 = one Linear
    activation: str = "gelu"  # activation inside encoder/project_out MLPs with >1 layer (State: activation)
    decoder_dropout: float = 0.1  # dropout in the gene decoder MLP (State: decoder_dropout)
    attention_dropout: float = 0.0  # dropout on attention weights (State: backbone attention_dropout)
    embed_vocab_size: int = 1  # rows of the unused, frozen token embedding (State's keeps 32000; read from its ckpt)
    output_relu: bool = False  # clamp predictions at 0 (State does when it has no gene decoder or uses X_hvg)
    final_down_then_up: bool = False  # State's output_space=all head: residual in input space, then D->D/8->D
    softplus: bool = True  # Softplus on decoded expression (non-negative); State runs load with ReLU instead
    # a new gene decoder gets a linear readout beside its MLP, fitted by ridge regression on the training cells, and
    # ends in ReLU. Why: the readout's slope turns predicted shifts into genes, and a short fine-tune leaves an
    # MLP's slope poor (the real embedding shift of a held-out cell type decodes to gene corr. 0.71 through the
    # MLP alone, 0.80 through the linear readout). State decoders load without it
    decoder_skip: bool = True
    decoder_skip_ridge: float = 1e-2  # ridge penalty of that readout, per training cell
    loss: str = "energy"  # energy | sinkhorn | mse, between predicted and real perturbed sets
    blur: float = 0.05  # sinkhorn blur (ignored by energy)
    set_mean_weight: float = 0.0  # + this x mean over D of (predicted set mean - real set mean)^2; 0 = off
    init_from: str | None = None  # stlib or State run dir, or a .ckpt, to fine-tune from; null = scratch
    lora: LoraConfig = field(default_factory=LoraConfig)
    use_mhc: bool = False  # manifold-constrained hyper-connections around every block
    mhc: MHCConfig = field(default_factory=MHCConfig)
    use_velocity_alignment: bool = False  # pull predicted shifts toward RNA velocity
    velocity_lambda: float = 0.1  # final weight of the velocity loss; 0 = off
    velocity_beta: float = 1.0  # confidence exponent; 0 weights all cells equally
    velocity_warmup_steps: int = 1000  # linear ramp of velocity_lambda from 0
    # move each predicted cell along its basal cell's RNA velocity by a learned gain per perturbation (zero at
    # start). Needs velocity for training *and* prediction (`stlib velocity`): a held-out cell type's own
    # trajectory is what the network, trained on other types, cannot know
    velocity_displacement: bool = False
    # the gains' learning rate = training.lr x this. Why: an Adam step moves a parameter by ~lr whatever its
    # gradient, and a gain must travel ~2-4 where network weights move ~0.01 (measured, 300 steps at lr 5e-3:
    # x1 -> gain 0.6, emb. corr 0.83; x10 -> 3.6, 0.89; x20 -> 4.1, 0.89)
    velocity_gain_lr_scale: float = 20.0

    def __post_init__(self):
        _check_choice("model.loss", self.loss, LOSSES)
        if self.set_mean_weight < 0:
            raise ConfigError(f"model.set_mean_weight must be >= 0, got {self.set_mean_weight}")
        _check_choice("model.residual_space", self.residual_space, RESIDUAL_SPACES)
        heads_dim = self.head_dim or self.hidden_dim // self.n_heads
        if self.head_dim is None and self.hidden_dim % self.n_heads:
            raise ConfigError(
                f"model.hidden_dim={self.hidden_dim} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly or choose a divisible pair"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if heads_dim < 1:
            raise ConfigError("model.head_dim must be >= 1")
        if self.velocity_lambda < 0:
            raise ConfigError(f"model.velocity_lambda must be >= 0, got {self.velocity_lambda}")
        if self.velocity_gain_lr_scale <= 0:
            raise ConfigError(f"model.velocity_gain_lr_scale must be > 0, got {self.velocity_gain_lr_scale}")
        if self.decoder_skip_ridge < 0:
            raise ConfigError(f"model.decoder_skip_ridge must be >= 0, got {self.decoder_skip_ridge}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_dim // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# the gene decoder's own architecture fields: a new decoder takes them from the fine-tune's config
DECODER_FIELDS = ("decoder_hidden", "decoder_dropout", "softplus", "decoder_skip")


@dataclass
class TrainingConfig:
    max_steps: int = 400  # optimizer steps
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 5e-4  # AdamW decoupled weight decay (not applied to norms and biases)
    warmup_steps: int = 20  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    batch_size: int = 8  # cell sets per step
    gradient_clip_val: float = 10.0  # clip the global gradient norm; 0 = off
    val_every_n_steps: int = 100  # validation interval in steps
    ckpt_every_n_steps: int = 200  # step_<N>.ckpt interval
    log_every_n_steps: int = 5
    devices: Any = "auto"  # Lightning devices: "auto", 1, [0, 1], ...
    accelerator: str = "auto"  # "auto" picks one GPU where present, else CPU
    strategy: str = "auto"  # Lightning strategy: "auto", "ddp", ...
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", ...
    seed: int = 42
    num_threads: int | None = None  # torch CPU threads; null = torch's default
    progress_bar: bool = True
    # average the trainable weights over every step from this fraction of max_steps on, and save that average as
    # final.ckpt (stochastic weight averaging at the end of the schedule); null = off. Why: an average of late
    # weights sits in a flatter minimum, which carries over better to cell types never seen in training
    average_weights_from: float | None = None

    def __post_init__(self):
        if self.average_weights_from is not None and not 0.0 <= self.average_weights_from < 1.0:
            raise ConfigError(f"training.average_weights_from must be in [0, 1) or null (off), got "
                              f"{self.average_weights_from}")


@dataclass
class Config:
    name: str = "run"  # run name: the run dir is {output_dir}/{name}
    output_dir: str = "results/runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- loading

# State's config nests options under `kwargs`; State also calls the backbone options differently.
_STATE_ALIASES = {
    "data.kwargs.": "data.",
    "model.kwargs.": "model.",
}


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _dealias(key: str) -> str:
    for old, new in _STATE_ALIASES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _known_keys() -> list[str]:
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            full = f"{prefix}{f.name}"
            out.append(full)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, full + ".")

    walk(Config(), "")
    return out


def _unknown_key_error(key: str) -> ConfigError:
    known = _known_keys()
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not guess:  # a typo in the last part only: compare leaves within the same group
        group, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
        leaf_guess = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        guess = [f"{group}.{leaf_guess[0]}"] if leaf_guess else []
    hint = f" — did you mean `{guess[0]}`?" if guess else ""
    return ConfigError(f"unknown config key `{key}`{hint}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _apply(base, flat: dict[str, Any], source: str):
    for key, value in flat.items():
        key = _dealias(key)
        if key not in _known_keys():
            err = _unknown_key_error(key)
            raise ConfigError(f"{err} (in {source})")
        try:
            OmegaConf.update(base, key, value, merge=True)
        except (ValidationError, ConfigKeyError) as exc:
            raise ConfigError(f"{key}={value!r} ({source}): {str(exc).splitlines()[0]}") from None
    return base


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: typed value}; values are parsed as YAML (numbers, lists, null)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. training.max_steps=400)")
        key, _, raw = item.partition("=")
        out[key.strip()] = OmegaConf.to_container(OmegaConf.create(f"v: {raw}"))["v"] if raw else None
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file(s) (a file may name `defaults: [other.yaml]`) <- dot-list overrides."""
    base = OmegaConf.structured(Config)
    if path is not None:
        for file in _with_defaults(Path(path)):
            raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True) or {}
            raw.pop("defaults", None)
            base = _apply(base, _flatten(raw), str(file))
    base = _apply(base, parse_overrides(overrides), "command line")
    try:
        return OmegaConf.to_object(base)
    except ConfigError:
        raise
    except (ValidationError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def _with_defaults(path: Path) -> list[Path]:
    """A YAML may inherit: `defaults: [../base.yaml]` (paths relative to the file). Parents come first."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    parents = raw.get("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    chain: list[Path] = []
    for parent in parents:
        chain += _with_defaults((path.parent / parent).resolve())
    return chain + [path]


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, overrides: Sequence[str] = ()) -> None:
    """Write the resolved config (and the overrides that produced it) as YAML."""
    conf = OmegaConf.create(config_to_dict(cfg))
    text = OmegaConf.to_yaml(conf)
    if overrides:
        text = "# overrides: " + " ".join(overrides) + "\n" + text
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def config_from_dict(d: dict) -> Config:
    base = OmegaConf.structured(Config)
    base = _apply(base, _flatten(d), "saved config")
    return OmegaConf.to_object(base)
