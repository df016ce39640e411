"""Typed experiment configuration: one dataclass per group, YAML files and dot-list overrides.

Groups: ``data``, ``model`` (the architecture), ``loss``, ``decoder``, ``velocity``, ``lora``, ``mhc``,
``training``. YAML files in ``configs/`` are merged onto these defaults and ``key.sub=value`` overrides go on
top, so the study plan's command lines (``training.max_steps=400 model.hidden_dim=256``) work as written. A
key that does not exist fails loudly with a suggestion, before any data is read.

Older spellings are accepted as aliases: State's (``data.kwargs.embed_key``, ``model.kwargs.hidden_dim``) and
stlib's flat ones from before the groups (``model.use_mhc``, ``model.lora.r``, ``model.velocity_lambda``), so
old run dirs and the study plan's configs still load.
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

from stlib.constants import VELOCITY_CONFIDENCE_KEY, velocity_key
from stlib.errors import ConfigError

OUTPUT_SPACES = ("embedding", "gene", "all")
LOSSES = ("energy", "sinkhorn", "mse")
MHC_KERNELS = ("auto", "numba", "torch")  # as stlib.adapters.mhc.KERNELS (that module does not import config)
RESIDUAL_SPACES = ("input", "hidden")
SMALL_GROUP_POLICIES = ("replace", "error")
# data keys without a sensible default: they name the user's own columns and files
REQUIRED_DATA_KEYS = ("toml_config_path", "embed_key", "pert_col", "control_pert", "cell_type_key")


@dataclass
class DataConfig:
    toml_config_path: str | None = None  # State-style TOML: [datasets] [training] [zeroshot] [fewshot]; required
    embed_key: str | None = None  # obsm key of the cell embedding the model works in, or "X"; required
    pert_col: str | None = None  # obs column naming each cell's perturbation; required
    control_pert: str | None = None  # value of pert_col for control (basal) cells; required
    cell_type_key: str | None = None  # obs column with cell types (a constant column works for one cell line)
    batch_col: str | None = None  # obs column for batches (mice, plates); null = off
    time_col: str | None = None  # obs column with time points, kept in predictions; null = off
    output_space: str = "embedding"  # embedding | gene | all: "gene"/"all" add a gene decoder
    gene_layer: str | None = None  # layer with log-normalised expression for the decoder; null = X
    velocity_key: str | None = None  # obsm key of velocity in the model's space; null = velocity_<embed_key>
    velocity_confidence_key: str = VELOCITY_CONFIDENCE_KEY  # obs column weighting the velocity loss
    perturbation_features_file: str | None = None  # .pt dict {name: vector}; null = one-hot
    small_group: str = "replace"  # group smaller than cell_set_len: "replace" samples with replacement, "error"
    sets_per_group: int = 8  # cell sets drawn per (cell type, perturbation, batch) group per validation pass
    num_workers: int = 0  # DataLoader workers; 0 = load in the training process
    seed: int = 0  # seed for the split sampler

    def __post_init__(self):
        _check_choice("data.output_space", self.output_space, OUTPUT_SPACES)
        _check_choice("data.small_group", self.small_group, SMALL_GROUP_POLICIES)

    def check_required(self) -> None:
        """Raise a ConfigError naming every required key left unset (called before data is read)."""
        missing = [f"data.{k}" for k in REQUIRED_DATA_KEYS if getattr(self, k) in (None, "")]
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set: they name your TOML file, obsm embedding and obs "
                              "columns (see configs/data/wound_healing.yaml for the embedded default's)")

    @property
    def resolved_velocity_key(self) -> str:
        return self.velocity_key or velocity_key(self.embed_key)


@dataclass
class ModelConfig:
    """The architecture: what a checkpoint's weights fit, inherited by a fine-tune from its base."""

    hidden_dim: int = 128  # transformer width
    cell_set_len: int | None = None  # cells per set ("cell sentence"); null = the base's, or 64 from scratch
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # attention heads
    head_dim: int | None = None  # per-head width; null = hidden_dim // n_heads
    n_kv_heads: int | None = None  # key/value heads; null = n_heads
    intermediate_size: int = 512  # transformer MLP width
    n_encoder_layers: int = 1  # Linear layers in the basal/perturbation encoders (State's count); 1 = one Linear
    n_decoder_layers: int = 1  # Linear layers in project_out (State: n_decoder_layers); 1 = one Linear
    activation: str = "gelu"  # activation inside encoder/project_out MLPs with >1 layer
    dropout: float = 0.0  # dropout in the encoders, project_out and confidence head
    attention_dropout: float = 0.0  # dropout on attention weights
    rms_norm_eps: float = 1e-6
    predict_residual: bool = True  # predict perturbed = basal + learned shift
    # where the residual lives: "input" = basal + project_out(h), so unseen cell types keep their identity;
    # "hidden" = State's project_out(h + basal_encoder(basal)) (State checkpoints load with it)
    residual_space: str = "input"
    batch_encoder: bool = False  # add a learned batch embedding (needs data.batch_col)
    confidence_token: bool = False  # append a token that predicts the set's loss
    time_encoder: bool = False  # add a learned, zero-initialised embedding of each set's time point (data.time_col)
    embed_vocab_size: int = 1  # rows of the unused, frozen token embedding (State keeps 32000; read from its ckpt)
    output_relu: bool = False  # clamp predictions at 0 (State does without a gene decoder or on X_hvg)
    final_down_then_up: bool = False  # State's output_space=all head: residual in input space, then D->D/8->D
    init_from: str | None = None  # stlib or State run dir, or a .ckpt, to fine-tune from; null = scratch
    # fine-tune on another input than the base read (another obsm key): the weights then meet data they were not
    # trained on, and the base's output clamp (output_relu) is not inherited but taken from this config
    allow_other_input: bool = False

    def __post_init__(self):
        _check_choice("model.residual_space", self.residual_space, RESIDUAL_SPACES)
        if self.head_dim is None and self.hidden_dim % self.n_heads:
            raise ConfigError(
                f"model.hidden_dim={self.hidden_dim} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly or choose a divisible pair"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if self.resolved_head_dim < 1:
            raise ConfigError("model.head_dim must be >= 1")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_dim // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# Fields of ModelConfig that are a fine-tune's own choice: where it starts, its set size (null: the base's), its
# dropout, whether it adds a time encoder, whether it accepts another input. A fine-tune inherits every other
# field from its base: the weights only fit that shape.
FINETUNE_FIELDS = ("init_from", "cell_set_len", "dropout", "time_encoder", "allow_other_input")
DEFAULT_CELL_SET_LEN = 64
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                            if f.name not in FINETUNE_FIELDS)


@dataclass
class LossConfig:
    name: str = "energy"  # energy | sinkhorn | mse, between predicted and real perturbed sets
    blur: float = 0.05  # sinkhorn blur (ignored by energy)
    set_mean_weight: float = 0.0  # + this x mean over D of (predicted set mean - real set mean)^2; 0 = off

    def __post_init__(self):
        _check_choice("loss.name", self.name, LOSSES)
        if self.set_mean_weight < 0:
            raise ConfigError(f"loss.set_mean_weight must be >= 0, got {self.set_mean_weight}")


@dataclass
class DecoderConfig:
    """The gene decoder (data.output_space=gene|all): a readout of expression from predicted cells."""

    hidden: list[int] = field(default_factory=lambda: [1024, 1024, 512])  # MLP widths
    dropout: float = 0.1  # dropout in the MLP
    loss_weight: float = 1.0  # weight of its per-cell MSE (real embedding -> real expression)
    softplus: bool = True  # Softplus output (non-negative); State decoders end in ReLU
    skip: bool = True  # a ridge-fitted linear readout beside the MLP, output ReLU (see docs/design.md)
    skip_ridge: float = 1e-2  # ridge penalty of that readout, per training cell

    def __post_init__(self):
        if self.skip_ridge < 0:
            raise ConfigError(f"decoder.skip_ridge must be >= 0, got {self.skip_ridge}")


# Fields of DecoderConfig that shape a decoder's weights: a base's decoder brings its own.
DECODER_FIELDS = ("hidden", "dropout", "softplus", "skip")


@dataclass
class VelocityConfig:
    alignment: bool = False  # pull predicted shifts toward the basal cells' RNA velocity (a loss term)
    loss_weight: float = 0.1  # final weight of the alignment loss (lambda); 0 = no effect
    beta: float = 1.0  # confidence exponent; 0 weights all cells equally
    warmup_steps: float = 1000  # linear ramp of loss_weight from 0: steps, or a fraction of max_steps below 1
    # move each predicted cell along its basal cell's velocity by a learned gain per perturbation (zero at start);
    # needs velocity for training and prediction (`stlib velocity`)
    displacement: bool = False
    gain_lr_scale: float = 1.0  # the gains' learning rate = training.lr x this (1: chosen on validation, analysis/selection.md)

    def __post_init__(self):
        if self.loss_weight < 0:
            raise ConfigError(f"velocity.loss_weight must be >= 0, got {self.loss_weight}")
        if self.gain_lr_scale <= 0:
            raise ConfigError(f"velocity.gain_lr_scale must be > 0, got {self.gain_lr_scale}")

    @property
    def needs_velocity(self) -> bool:
        """Whether training and prediction read the cells' velocity from the data."""
        return self.alignment or self.displacement


@dataclass
class LoraConfig:
    enable: bool = False  # off = the plain model, every weight trainable
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    adapt_mlp: bool = False  # also adapt gate/up/down projections of the transformer MLP
    # trained in full beside the adapters: what a new experiment needs (its new perturbations)
    modules_to_save: list[str] = field(default_factory=lambda: ["pert_encoder"])

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r} (use lora.enable=false to turn LoRA off)")


@dataclass
class MHCConfig:
    enable: bool = False  # manifold-constrained hyper-connections around every residual branch
    n_streams: int = 4  # residual streams; 1 = plain residual
    sinkhorn_iters: int = 20  # cap on Sinkhorn-Knopp iterations
    sinkhorn_tol: float = 1e-6  # stop early when row and column sums are this close to 1
    alpha_init: float = 0.01  # initial gate on the dynamic (token-dependent) coefficients
    kernel: str = "auto"  # per-token stream work: auto = compiled loops on CPU, torch ops elsewhere; numba | torch

    def __post_init__(self):
        _check_choice("mhc.kernel", self.kernel, MHC_KERNELS)
        if self.n_streams < 1:
            raise ConfigError(f"mhc.n_streams must be >= 1, got {self.n_streams}")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"mhc.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


@dataclass
class TrainingConfig:
    max_steps: int = 400  # optimizer steps
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 5e-4  # AdamW decoupled weight decay (not applied to norms and biases)
    warmup_steps: int = 20  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    batch_size: int = 8  # cell sets per step
    gradient_clip_val: float = 10.0  # clip the global gradient norm; 0 = off
    # intervals: a whole number of steps, or a fraction of max_steps below 1 (0.1 = every tenth of the run)
    val_every_n_steps: float = 100  # validation interval
    ckpt_every_n_steps: float = 200  # step_<N>.ckpt interval
    log_every_n_steps: float = 5  # scalar logging interval
    keep_checkpoints: int = 2  # step checkpoints kept (the newest), beside last.ckpt and final.ckpt; -1 = all
    devices: Any = "auto"  # Lightning devices per node: "auto" (one), 1, 4, [0, 1], ...
    num_nodes: int = 1  # machines for data-parallel training (SLURM: the generated .sbatch asks for them)
    accelerator: str = "auto"  # "auto" picks one GPU where present, else CPU
    strategy: str = "auto"  # Lightning strategy: "auto", "ddp", ...
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", ...
    seed: int = 42
    num_threads: int | None = None  # torch CPU threads; null = torch's default
    progress_bar: bool = True  # a tqdm bar on a terminal; piped to a file or a notebook, plain step lines only
    # average the trainable weights over every step from this fraction of max_steps on, and save that average as
    # final.ckpt (stochastic weight averaging at the end of the schedule); null = off. Why: an average of late
    # weights sits in a flatter minimum, which carries over better to cell types never seen in training
    average_weights_from: float | None = None

    def __post_init__(self):
        for key in ("val_every_n_steps", "ckpt_every_n_steps", "log_every_n_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"training.{key} must be > 0 (steps, or a fraction of max_steps below 1), got "
                                  f"{getattr(self, key)}")
        if self.keep_checkpoints < -1:
            raise ConfigError(f"training.keep_checkpoints must be >= 0 or -1 (all), got {self.keep_checkpoints}")
        if self.average_weights_from is not None and not 0.0 <= self.average_weights_from < 1.0:
            raise ConfigError(f"training.average_weights_from must be in [0, 1) or null (off), got "
                              f"{self.average_weights_from}")


    def steps(self, interval: float) -> int:
        """An interval in steps: whole numbers as they are, a fraction below 1 of max_steps (at least 1 step)."""
        return max(1, round(interval * self.max_steps)) if interval < 1 else int(interval)


@dataclass
class Config:
    name: str = "run"  # run name: the run dir is {output_dir}/{name}
    output_dir: str = "results/runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    velocity: VelocityConfig = field(default_factory=VelocityConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- loading

# Older spellings -> current keys, tried in order: State nests options under `kwargs`, and stlib's configs
# before the groups kept losses, decoder, velocity, LoRA and mHC under `model`. A prefix ends in ".".
_ALIASES = {
    "data.kwargs.": "data.",
    "model.kwargs.": "model.",
    "model.lora.": "lora.",
    "model.mhc.": "mhc.",
    "model.use_mhc": "mhc.enable",
    "model.loss": "loss.name",
    "model.blur": "loss.blur",
    "model.set_mean_weight": "loss.set_mean_weight",
    "model.decoder_hidden": "decoder.hidden",
    "model.decoder_dropout": "decoder.dropout",
    "model.decoder_loss_weight": "decoder.loss_weight",
    "model.softplus": "decoder.softplus",
    "model.decoder_skip_ridge": "decoder.skip_ridge",
    "model.decoder_skip": "decoder.skip",
    "model.use_velocity_alignment": "velocity.alignment",
    "model.velocity_lambda": "velocity.loss_weight",
    "model.velocity_beta": "velocity.beta",
    "model.velocity_warmup_steps": "velocity.warmup_steps",
    "model.velocity_displacement": "velocity.displacement",
    "model.velocity_gain_lr_scale": "velocity.gain_lr_scale",
}


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _dealias(key: str) -> str:
    for old, new in _ALIASES.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            key = new + key[len(old):]
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


def _unknown_key_error(key: str, written: str | None = None) -> ConfigError:
    known = _known_keys()
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not guess:  # a typo in the last part only: compare leaves within the same group
        group, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
        leaf_guess = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        guess = [f"{group}.{leaf_guess[0]}"] if leaf_guess else []
    hint = f" — did you mean `{guess[0]}`?" if guess else ""
    read_as = f" (read as `{key}`)" if written and written != key else ""
    return ConfigError(f"unknown config key `{written or key}`{read_as}{hint}")


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
    known = _known_keys()
    for written, value in flat.items():
        key = _dealias(written)
        if key not in known:
            err = _unknown_key_error(key, written)
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
