"""The embedded default data: a simulated Burn/Sham skin experiment and a drug-screen source domain.

Why: the whole study (pretrain -> fine-tune -> compare variants) must run offline, with a known answer.
``write_default_data`` writes two AnnData files that share genes and one fixed embedding map:

* ``wound_healing.h5ad`` — mouse skin, condition Sham (control) / Burn, days 10/14/19, 12 mice (one
  condition and day per mouse, 2 per (condition, day), each with its own batch effect), 7 cell types,
  each differentiating along its own trajectory (basal -> differentiated keratinocyte, fibroblast ->
  myofibroblast, monocyte -> macrophage, ...). Counts come from transcription-splicing-degradation
  kinetics, du/dt = a(t) - b u, ds/dt = b u - g s, integrated exactly per time step along each trajectory,
  then gamma-Poisson (negative binomial) sampled, so scvelo recovers a real velocity field.
* ``source_perturbations.h5ad`` — stand-in for ST-Tahoe's training data: 20 drugs + control "DMSO_TF" on
  4 cell lines over 4 plates; cells at steady state (no trajectories), drug effects built from a few
  shared response programs (one is the inflammation program, one the maturation program) plus
  drug-specific genes.

The Burn effect (the known answer, stored in ``uns["ground_truth"]``) has two parts, both scaled by a
per-cell-type "responsiveness" r_c that each cell type shows in its basal state (the receptor gene
program is expressed in proportion to r_c), and both fading with day (day scale 1.0 / 0.55 / 0.2):

* along the trajectory: Burn cells sit further along their own trajectory (pseudotime + shift_c(day)),
  so the effect depends on each cell's state and RNA velocity points the same way;
* orthogonal: the inflammation program's transcription rate is multiplied by 1 + A r_c day_scale w_g
  (shared genes, cell-type-specific strength).

So a model that sees a held-out cell type's Sham cells can beat "no change" and "training-set mean
shift": the shared program is learnable across cell types, its strength and the trajectory part are
readable from the basal state.

Conventions (scvelo's): ``X`` = raw spliced counts (CSR int32), ``layers["spliced"]``/``["unspliced"]``
CSR int32, ``layers["log1p"]`` = log1p(normalize_total(X, 1e4)) as CSR float32. The embedding
``obsm["X_state"]`` (dimension D) is ``scale * (log1p_norm(counts) - mean) @ components`` with PCA
components fitted once on both domains pooled (a stand-in for a foundation-model embedding trained on
a broad corpus); the map lives in ``embedding_map.npz`` and ``embed_expression`` applies it to new cells.

Shape letters: N cells, G genes, D embedding dimension, C cell types, T days.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from stlib.data.io import write_h5ad
from stlib.errors import ConfigError

TARGET_SUM = 1e4  # normalize_total target before log1p, in the embedding and the log1p layer
EMBED_KEY = "X_state"
TRUE_VELOCITY_KEY = f"true_velocity_{EMBED_KEY}"
EMBEDDING_MAP_FILE = "embedding_map.npz"
DAYS = (10, 14, 19)
DAY_SCALE = (1.0, 0.55, 0.2)  # strength of the Burn effect per day: strong at day 10, fading by 19
CONTROL, PERTURBED = "Sham", "Burn"
SOURCE_CONTROL = "DMSO_TF"
CELL_LINES = ("A549", "MCF7", "HepG2", "K562")
N_DRUGS = 20
N_PLATES = 4
MICE_PER_GROUP = 3
N_GRID = 400  # pseudotime grid points for the kinetics integration
INFLAMMATION_GAIN = 2.5  # A in the inflammation multiplier 1 + A r_c day_scale w_g
NB_DISPERSION = 0.2  # negative-binomial overdispersion (variance = mu + phi mu^2)
CAPTURE = 2.0  # expected molecules per unit of expression level (sets the library size)
BATCH_SD = 0.05  # per-mouse / per-plate log-normal gene-wise batch effect on transcription rates


@dataclass(frozen=True)
class CellTypeSpec:
    trajectory: str  # what the trajectory stands for (documentation only)
    responsiveness: float  # r_c: scales both parts of the Burn effect and the receptor program
    proportion: float  # share of cells in Sham at day 10 (renormalised)
    burn_enrichment: float  # composition fold change in Burn at day 10 (fades with the day scale)
    horizon: float  # kinetic time (in 1/degradation units) spanned by pseudotime 0 -> 1


CELL_TYPES: dict[str, CellTypeSpec] = {
    "Keratinocyte": CellTypeSpec("basal -> differentiated keratinocyte", 0.40, 0.24, 0.8, 12.0),
    "Fibroblast": CellTypeSpec("fibroblast -> myofibroblast", 0.55, 0.20, 1.3, 10.0),
    "Macrophage": CellTypeSpec("monocyte -> macrophage", 0.85, 0.12, 2.0, 10.0),
    "Neutrophil": CellTypeSpec("immature -> mature neutrophil", 1.00, 0.07, 3.0, 8.0),
    "Endothelial": CellTypeSpec("quiescent -> angiogenic endothelial", 0.35, 0.13, 1.2, 12.0),
    "Tcell": CellTypeSpec("naive -> effector T cell", 0.65, 0.08, 1.0, 10.0),
    "Pericyte": CellTypeSpec("pericyte -> activated pericyte", 0.25, 0.09, 1.0, 12.0),
}
# zero-shot split written into wound_healing.toml: held-out cell types all have trajectories
ZEROSHOT = {"Fibroblast": "test", "Macrophage": "test", "Endothelial": "val"}
SOURCE_VAL_LINE = "K562"


def heldout_mice() -> dict[str, str]:
    """Mouse id -> split for wound_healing_mice.toml: of each day's Burn mice, one validates and one tests."""
    out = {}
    for d in range(len(DAYS)):
        first = (len(DAYS) + d) * MICE_PER_GROUP  # mice are numbered Sham days first, then Burn days
        out[f"M{first + 2:02d}"], out[f"M{first + 3:02d}"] = "val", "test"
    return out


# --------------------------------------------------------------------------------------------- genes


@dataclass(frozen=True)
class GenePrograms:
    """Which genes do what, and their kinetic rates; shared by both datasets (same var_names)."""

    names: np.ndarray  # [G] str
    beta: np.ndarray  # [G] splicing rate
    gamma: np.ndarray  # [G] degradation rate
    programs: dict[str, np.ndarray]  # program name -> gene indices

    @property
    def n_genes(self) -> int:
        return len(self.names)


def make_gene_programs(n_genes: int = 1000, seed: int = 0) -> GenePrograms:
    """Partition genes into housekeeping, markers, trajectories, maturation, inflammation, receptor, background."""
    rng = np.random.default_rng([seed, 0])
    n_types = len(CELL_TYPES)
    sizes = {
        "housekeeping": max(10, n_genes // 10),
        "maturation": max(8, n_genes // 25),
        "inflammation": max(8, n_genes // 25),
        "receptor": max(5, n_genes // 100),
    }
    per_type_marker = max(5, (3 * n_genes) // 100)
    per_type_traj = max(8, n_genes // 25)
    needed = sum(sizes.values()) + n_types * (per_type_marker + per_type_traj)
    if needed > 0.9 * n_genes:
        raise ConfigError(f"n_genes={n_genes} is too small for the gene programs: need at least {int(needed / 0.9) + 1}")
    order = rng.permutation(n_genes)
    programs, start = {}, 0
    for name, size in sizes.items():
        programs[name] = np.sort(order[start : start + size])
        start += size
    for ct in CELL_TYPES:
        programs[f"marker_{ct}"] = np.sort(order[start : start + per_type_marker])
        start += per_type_marker
        programs[f"trajectory_{ct}"] = order[start : start + per_type_traj]  # first 2/3 go up, the rest down
        start += per_type_traj
    programs["background"] = np.sort(order[start:])
    beta = rng.lognormal(0.0, 0.3, n_genes)
    gamma = np.clip(rng.lognormal(np.log(0.4), 0.4, n_genes), 0.08, 2.0)
    gamma = np.where(np.abs(gamma - beta) < 1e-3, gamma + 2e-3, gamma)  # the exact solution divides by g - b
    names = np.array([f"g{i:04d}" for i in range(n_genes)])
    return GenePrograms(names, beta, gamma, programs)


# ------------------------------------------------------------------------------------------- kinetics


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _trajectory_levels(gp: GenePrograms, rng: np.random.Generator) -> np.ndarray:
    """Expression level (steady-state spliced units) per cell type, pseudotime grid point, gene: [C, K, G]."""
    G, C = gp.n_genes, len(CELL_TYPES)
    grid = np.linspace(0.0, 1.0, N_GRID)
    base = rng.lognormal(np.log(0.3), 1.0, G)  # background level everywhere
    hk = gp.programs["housekeeping"]
    base[hk] = rng.lognormal(np.log(8.0), 0.8, len(hk))
    base[gp.programs["inflammation"]] = rng.lognormal(np.log(1.0), 0.5, len(gp.programs["inflammation"]))
    levels = np.broadcast_to(base, (C, N_GRID, G)).copy()
    receptor = gp.programs["receptor"]
    receptor_w = rng.uniform(0.5, 1.5, len(receptor))
    mat = gp.programs["maturation"]
    for c, (ct, spec) in enumerate(CELL_TYPES.items()):
        marker = gp.programs[f"marker_{ct}"]
        levels[c, :, marker] = rng.lognormal(np.log(6.0), 0.7, len(marker))[:, None]
        levels[c, :, receptor] = (0.5 + 8.0 * spec.responsiveness * receptor_w)[:, None]
        traj = gp.programs[f"trajectory_{ct}"]
        n_up = (2 * len(traj)) // 3
        hi = rng.lognormal(np.log(10.0), 0.6, len(traj))
        lo = 0.15 * hi
        switch = rng.uniform(0.1, 0.6, len(traj))
        ramp = _sigmoid((grid[:, None] - switch[None, :]) / 0.04)  # [K, n_traj]
        ramp[:, n_up:] = 1.0 - ramp[:, n_up:]
        levels[c][:, traj] = lo + (hi - lo) * ramp
        amp = rng.uniform(0.3, 1.0, len(mat)) * rng.lognormal(np.log(8.0), 0.5, len(mat))
        mswitch = rng.uniform(0.1, 0.6, len(mat))
        levels[c][:, mat] = 0.5 + amp * _sigmoid((grid[:, None] - mswitch[None, :]) / 0.04)
    return levels


def _integrate(levels: np.ndarray, gp: GenePrograms) -> tuple[np.ndarray, np.ndarray]:
    """Exact piecewise-constant-rate solution of du/dt = a - b u, ds/dt = b u - g s on each trajectory.

    levels are steady-state spliced levels, so a = level * g; cells start at the steady state of t=0.
    Returns u, s: [C, K, G]."""
    b, g = gp.beta, gp.gamma
    alpha = levels * g
    u = np.empty_like(alpha)
    s = np.empty_like(alpha)
    u[:, 0] = alpha[:, 0] / b
    s[:, 0] = alpha[:, 0] / g
    horizons = np.array([spec.horizon for spec in CELL_TYPES.values()])
    h = (horizons / (N_GRID - 1))[:, None]  # [C, 1] kinetic time per grid step
    eb, eg = np.exp(-b * h), np.exp(-g * h)
    for k in range(1, N_GRID):
        a, u0, s0 = alpha[:, k - 1], u[:, k - 1], s[:, k - 1]
        u[:, k] = u0 * eb + a / b * (1 - eb)
        s[:, k] = s0 * eg + a / g * (1 - eg) + (a - b * u0) / (g - b) * (eg - eb)
    return u, s


def _at(curve: np.ndarray, c: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Linear interpolation of curve[C, K, G] at cell types c [N] and pseudotimes tau [N] in [0, 1]."""
    x = np.clip(tau, 0.0, 1.0) * (N_GRID - 1)
    k = np.minimum(x.astype(int), N_GRID - 2)
    w = (x - k)[:, None]
    return curve[c, k] * (1 - w) + curve[c, k + 1] * w


def log1p_normalize(counts) -> np.ndarray:
    """log1p(normalize_total(counts, 1e4)) for a dense or sparse [N, G] matrix -> dense float64."""
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    total = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(total, 1e-12) * TARGET_SUM)


def _negative_binomial(rng: np.random.Generator, mu: np.ndarray) -> np.ndarray:
    shape = 1.0 / NB_DISPERSION
    return rng.poisson(mu * rng.gamma(shape, 1.0 / shape, mu.shape)).astype(np.int32)


def _pseudotime_beta(day_index: int) -> tuple[float, float]:
    """Sham pseudotime distribution per day: slightly more mature at later days (the Sham drift)."""
    return 1.6 + 0.3 * day_index, 2.2


def _shift(spec: CellTypeSpec, day_index: int) -> float:
    return (0.12 + 0.2 * spec.responsiveness) * DAY_SCALE[day_index]


def _inflammation(spec: CellTypeSpec, day_index: int, weights: np.ndarray) -> np.ndarray:
    return 1.0 + INFLAMMATION_GAIN * spec.responsiveness * DAY_SCALE[day_index] * weights


# ------------------------------------------------------------------------------------ wound healing


@dataclass
class _Simulated:
    adata: ad.AnnData
    expected: np.ndarray | None = None  # [N, G] noiseless spliced level per cell (for the true velocity)
    d_expected: np.ndarray | None = None  # [N, G] its derivative along pseudotime


def _composition(day_index: int, condition: str) -> np.ndarray:
    p = np.array([spec.proportion for spec in CELL_TYPES.values()])
    if condition == PERTURBED:
        p = p * np.array([spec.burn_enrichment for spec in CELL_TYPES.values()]) ** DAY_SCALE[day_index]
    else:  # Sham drifts a little with day: keratinocytes gain share
        p = p * np.array([1.0 + 0.1 * day_index if ct == "Keratinocyte" else 1.0 for ct in CELL_TYPES])
    return p / p.sum()


def _simulate_wound(n_cells: int, gp: GenePrograms, seed: int) -> _Simulated:
    rng = np.random.default_rng([seed, 1])
    G, types = gp.n_genes, list(CELL_TYPES)
    specs = list(CELL_TYPES.values())
    u_grid, s_grid = _integrate(_trajectory_levels(gp, rng), gp)
    infl_idx = gp.programs["inflammation"]
    infl_w = rng.uniform(0.5, 2.0, len(infl_idx))

    groups = [(cond, d) for cond in (CONTROL, PERTURBED) for d in range(len(DAYS))]
    n_mice = len(groups) * MICE_PER_GROUP
    per_mouse = np.full(n_mice, n_cells // n_mice)
    per_mouse[: n_cells % n_mice] += 1
    cols = {k: [] for k in ("condition", "day", "mouse_id", "cell_type", "tau", "tau0")}
    mouse_gene, mouse_lib = [], []
    for m in range(n_mice):
        cond, d = groups[m // MICE_PER_GROUP]
        n = per_mouse[m]
        p = rng.dirichlet(200 * _composition(d, cond))
        ct = rng.choice(len(types), size=n, p=p)
        tau0 = rng.beta(*_pseudotime_beta(d), size=n)
        shift = np.array([_shift(specs[c], d) for c in ct]) if cond == PERTURBED else np.zeros(n)
        cols["condition"] += [cond] * n
        cols["day"] += [DAYS[d]] * n
        cols["mouse_id"] += [f"M{m + 1:02d}"] * n
        cols["cell_type"].append(ct)
        cols["tau0"].append(tau0)
        cols["tau"].append(np.minimum(tau0 + shift, 1.0))
        mouse_gene.append(np.exp(rng.normal(0.0, BATCH_SD, G)))
        mouse_lib.append(np.exp(rng.normal(0.0, 0.15)))
    ct = np.concatenate(cols["cell_type"])
    tau = np.concatenate(cols["tau"])
    mouse = np.repeat(np.arange(n_mice), per_mouse)
    burn = np.array(cols["condition"]) == PERTURBED
    day_index = np.searchsorted(DAYS, np.array(cols["day"]))

    # per-cell multiplier on the transcription rate: mouse batch x (Burn) inflammation; linear ODE -> scales u, s
    mult = np.stack(mouse_gene)[mouse]
    infl = np.stack([[_inflammation(spec, d, infl_w) for d in range(len(DAYS))] for spec in specs])  # [C, T, n]
    mult[np.ix_(burn, infl_idx)] *= infl[ct[burn], day_index[burn]]
    u = _at(u_grid, ct, tau) * mult
    s = _at(s_grid, ct, tau) * mult
    horizon = np.array([spec.horizon for spec in specs])[ct][:, None]
    ds = horizon * (gp.beta * u - gp.gamma * s)  # ds/d(pseudotime)
    lib = rng.lognormal(0.0, 0.3, len(ct)) * np.array(mouse_lib)[mouse] * CAPTURE
    spliced = _negative_binomial(rng, s * lib[:, None])
    unspliced = _negative_binomial(rng, u * lib[:, None])

    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(cols["condition"], categories=[CONTROL, PERTURBED]),
            "day": np.array(cols["day"], dtype=np.int64),
            "mouse_id": pd.Categorical(cols["mouse_id"]),
            "cell_types_simple_short": pd.Categorical(np.array(types)[ct], categories=types),
            "pseudotime": tau.astype(np.float32),
        },
        index=[f"wh_{i:06d}" for i in range(len(ct))],
    )
    adata = _counts_to_anndata(spliced, unspliced, obs, gp)
    adata.uns["ground_truth"] = _wound_truth(gp, s_grid, infl_w)
    return _Simulated(adata, s, ds)


def _wound_truth(gp: GenePrograms, s_grid: np.ndarray, infl_w: np.ndarray) -> dict:
    """Mean Burn - Sham effect per cell type x day in log1p-normalised expression, without batch or noise.

    Averaged over 256 quantiles of that day's Sham pseudotime distribution: E[h(burn(tau0))] - E[h(tau0)]."""
    specs = list(CELL_TYPES.values())
    q = (np.arange(256) + 0.5) / 256
    infl_idx = gp.programs["inflammation"]
    effect = np.zeros((len(specs), len(DAYS), gp.n_genes))
    shifts = np.zeros((len(specs), len(DAYS)))
    strength = np.zeros((len(specs), len(DAYS)))
    for d in range(len(DAYS)):
        tau0 = stats.beta.ppf(q, *_pseudotime_beta(d))
        for c, spec in enumerate(specs):
            cc = np.full(len(q), c)
            sham = _at(s_grid, cc, tau0)
            burn = _at(s_grid, cc, np.minimum(tau0 + _shift(spec, d), 1.0))
            burn[:, infl_idx] *= _inflammation(spec, d, infl_w)
            effect[c, d] = log1p_normalize(burn).mean(0) - log1p_normalize(sham).mean(0)
            shifts[c, d] = _shift(spec, d)
            strength[c, d] = INFLAMMATION_GAIN * spec.responsiveness * DAY_SCALE[d]
    return {
        "description": (
            "Burn - Sham mean effect per cell type x day in log1p(normalize_total 1e4) expression (no batch, no "
            "noise); trajectory_shift in pseudotime units; inflammation_strength = A r_c day_scale"
        ),
        "cell_types": np.array(list(CELL_TYPES)),
        "days": np.array(DAYS, dtype=np.int64),
        "day_scale": np.array(DAY_SCALE),
        "responsiveness": np.array([spec.responsiveness for spec in specs]),
        "effect_log1p": effect.astype(np.float32),
        "trajectory_shift": shifts,
        "inflammation_strength": strength,
        "inflammation_gene_weights": infl_w,
        "programs": {k: v.astype(np.int64) for k, v in gp.programs.items()},
        "kinetics": {"beta": gp.beta, "gamma": gp.gamma},
    }


def _counts_to_anndata(spliced: np.ndarray, unspliced: np.ndarray | None, obs: pd.DataFrame, gp) -> ad.AnnData:
    x = sp.csr_matrix(spliced)
    layers = {"spliced": x.copy(), "log1p": sp.csr_matrix(log1p_normalize(spliced).astype(np.float32))}
    if unspliced is not None:
        layers["unspliced"] = sp.csr_matrix(unspliced)
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=gp.names), layers=layers)


# ---------------------------------------------------------------------------------------- source


def _simulate_source(n_cells: int, gp: GenePrograms, seed: int) -> _Simulated:
    rng = np.random.default_rng([seed, 2])
    G = gp.n_genes
    base = rng.lognormal(np.log(0.3), 1.0, G)
    hk = gp.programs["housekeeping"]
    base[hk] = rng.lognormal(np.log(8.0), 0.8, len(hk))
    base[gp.programs["inflammation"]] = rng.lognormal(np.log(1.0), 0.5, len(gp.programs["inflammation"]))
    receptor = gp.programs["receptor"]
    line_levels, line_resp = [], rng.uniform(0.2, 1.0, len(CELL_LINES))
    for r in line_resp:
        lv = base * rng.lognormal(0.0, 0.3, G)
        markers = rng.choice(G, size=max(5, G // 20), replace=False)
        lv[markers] = rng.lognormal(np.log(6.0), 0.7, len(markers))
        lv[receptor] = 0.5 + 8.0 * r * rng.uniform(0.5, 1.5, len(receptor))
        line_levels.append(lv)
    line_levels = np.stack(line_levels)  # [L, G]

    # response programs: 0 inflammation, 1 maturation, then random gene sets; weights per gene
    progs = [gp.programs["inflammation"], gp.programs["maturation"]]
    progs += [rng.choice(G, size=max(8, G // 25), replace=False) for _ in range(4)]
    prog_w = np.zeros((len(progs), G))
    for k, idx in enumerate(progs):
        prog_w[k, idx] = rng.uniform(0.5, 1.5, len(idx)) * (1 if k < 2 else rng.choice([-1, 1], len(idx)))
    drugs = [SOURCE_CONTROL] + [f"Drug{i + 1:02d}" for i in range(N_DRUGS)]
    loadings = np.zeros((len(drugs), len(progs)))
    own = np.zeros((len(drugs), G))
    for d in range(1, len(drugs)):
        ks = rng.choice(len(progs), size=rng.integers(1, 3), replace=False)
        loadings[d, ks] = rng.uniform(0.5, 1.5, len(ks))
        genes = rng.choice(G, size=8, replace=False)
        own[d, genes] = rng.normal(0.0, 1.0, 8)
    sens = rng.uniform(0.5, 1.5, (len(CELL_LINES), len(drugs)))
    sens_infl = sens * line_resp[:, None]  # the inflammation response follows receptor expression, as in skin

    def log_fold(line: int, drug: int) -> np.ndarray:
        lf = sens[line, drug] * (loadings[drug, 1:] @ prog_w[1:] + own[drug])
        return lf + sens_infl[line, drug] * loadings[drug, 0] * prog_w[0]

    p = np.ones(len(drugs))
    p[0] = 3.0  # more control cells, as in a screen
    drug = rng.choice(len(drugs), size=n_cells, p=p / p.sum())
    line = rng.integers(0, len(CELL_LINES), n_cells)
    plate = rng.integers(0, N_PLATES, n_cells)
    plate_gene = np.exp(rng.normal(0.0, BATCH_SD, (N_PLATES, G)))
    plate_lib = np.exp(rng.normal(0.0, 0.15, N_PLATES))
    folds = np.stack([[log_fold(li, d) for d in range(len(drugs))] for li in range(len(CELL_LINES))])  # [L, Dr, G]
    s = line_levels[line] * np.exp(folds[line, drug]) * plate_gene[plate]
    u = s * gp.gamma / gp.beta  # steady state: u = a / b, s = a / g
    lib = rng.lognormal(0.0, 0.3, n_cells) * plate_lib[plate] * CAPTURE
    spliced = _negative_binomial(rng, s * lib[:, None])
    unspliced = _negative_binomial(rng, u * lib[:, None])
    obs = pd.DataFrame(
        {
            "drug": pd.Categorical(np.array(drugs)[drug], categories=drugs),
            "cell_line": pd.Categorical(np.array(CELL_LINES)[line], categories=list(CELL_LINES)),
            "plate": pd.Categorical([f"plate{k + 1}" for k in plate]),
        },
        index=[f"src_{i:06d}" for i in range(n_cells)],
    )
    adata = _counts_to_anndata(spliced, unspliced, obs, gp)
    ctrl = log1p_normalize(line_levels)
    effect = np.stack(
        [log1p_normalize(line_levels[li] * np.exp(folds[li])) - ctrl[li] for li in range(len(CELL_LINES))]
    )
    adata.uns["ground_truth"] = {
        "description": "drug - DMSO_TF effect per cell line x drug in log1p(normalize_total 1e4) expression",
        "cell_lines": np.array(CELL_LINES),
        "drugs": np.array(drugs),
        "effect_log1p": effect.astype(np.float32),
        "drug_program_loadings": loadings,
        "program_names": np.array(["inflammation", "maturation", "random1", "random2", "random3", "random4"]),
        "line_responsiveness": line_resp,
    }
    return _Simulated(adata)


# ------------------------------------------------------------------------------------- embedding


def fit_embedding_map(log1p_expr: np.ndarray, var_names, embed_dim: int = 64) -> dict[str, np.ndarray]:
    """PCA of log1p-normalised expression -> {mean [G], components [G, D], scale, target_sum, var_names}.

    Signs are fixed (largest loading positive) and scale makes the mean per-dimension variance 1."""
    x = np.asarray(log1p_expr, dtype=np.float64)
    if embed_dim > min(x.shape):
        raise ConfigError(f"embed_dim={embed_dim} must be <= min(n_cells, n_genes)={min(x.shape)}")
    mean = x.mean(0)
    xc = x - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    order = np.argsort(evals)[::-1][:embed_dim]
    comps = evecs[:, order]
    comps *= np.sign(comps[np.abs(comps).argmax(0), np.arange(embed_dim)])
    scale = 1.0 / np.sqrt(evals[order].clip(min=1e-12).mean())
    return {
        "mean": mean.astype(np.float32),
        "components": comps.astype(np.float32),
        "scale": np.float32(scale),
        "target_sum": np.float32(TARGET_SUM),
        "var_names": np.asarray(var_names).astype(str),
    }


def load_embedding_map(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _project(log1p_expr: np.ndarray, emap: Mapping[str, np.ndarray]) -> np.ndarray:
    return ((log1p_expr - emap["mean"]) @ emap["components"].astype(np.float64)) * float(emap["scale"])


def embed_expression(counts, embedding_map: Mapping[str, np.ndarray] | str | Path) -> np.ndarray:
    """Raw counts [N, G] -> embedding [N, D] float32, the same fixed map for every dataset and new cells."""
    emap = load_embedding_map(embedding_map) if isinstance(embedding_map, (str, Path)) else embedding_map
    n_genes = emap["components"].shape[0]
    if counts.shape[1] != n_genes:
        raise ValueError(f"counts have {counts.shape[1]} genes but the embedding map expects {n_genes}")
    return _project(log1p_normalize(counts), emap).astype(np.float32)


def _attach_embedding(sim: _Simulated, emap: Mapping[str, np.ndarray], map_file: str = EMBEDDING_MAP_FILE) -> None:
    """obsm["X_state"] from the counts; for simulated trajectories also the true velocity in that space."""
    adata = sim.adata
    adata.obsm[EMBED_KEY] = _project(log1p_normalize(adata.X), emap).astype(np.float32)
    adata.uns["embedding"] = {
        "key": EMBED_KEY,
        "file": map_file,
        "recipe": "scale * (log1p(normalize_total(X, target_sum)) - mean) @ components",
    }
    if sim.expected is not None:
        eps = 1e-3  # pseudotime step for the finite difference through normalize + log1p
        f0 = _project(log1p_normalize(sim.expected), emap)
        f1 = _project(log1p_normalize(sim.expected + eps * sim.d_expected), emap)
        adata.obsm[TRUE_VELOCITY_KEY] = ((f1 - f0) / eps).astype(np.float32)
    truth = adata.uns.get("ground_truth")
    if truth is not None and "effect_log1p" in truth:  # the affine map carries mean effects over exactly
        eff = truth["effect_log1p"]
        truth["effect_embedding"] = (eff @ emap["components"] * emap["scale"]).astype(np.float32)


def _map_or_fit(embedding_map: Mapping | None, sim: _Simulated, embed_dim: int) -> Mapping:
    if embedding_map is not None:
        return embedding_map
    return fit_embedding_map(sim.adata.layers["log1p"].toarray(), sim.adata.var_names, embed_dim)


def make_wound_healing(
    n_cells: int = 6000, n_genes: int = 1000, seed: int = 0, embedding_map: Mapping | None = None, embed_dim: int = 64
) -> ad.AnnData:
    """The simulated Burn/Sham skin experiment; without an embedding map, one is fitted on these cells."""
    gp = make_gene_programs(n_genes, seed)
    sim = _simulate_wound(n_cells, gp, seed)
    _attach_embedding(sim, _map_or_fit(embedding_map, sim, embed_dim))
    return sim.adata


# ------------------------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # JSON strings are valid TOML basic strings


def write_state_toml(
    path: str | Path,
    datasets: Mapping[str, str],
    training: Mapping[str, str],
    zeroshot: Mapping[str, str] | None = None,
    fewshot: Mapping[str, Mapping[str, list]] | None = None,
    heldout_batches: Mapping[str, str] | None = None,
) -> Path:
    """Write a State data TOML: [datasets] name = path, [training], [zeroshot] "ds.celltype" = split,
    [fewshot."ds.celltype"] split = [perts], and stlib's [heldout_batches] "ds.batch" = split when given.
    Dataset paths are kept as given (relative = to the TOML's folder)."""
    lines = []
    tables = [("datasets", datasets), ("training", training), ("zeroshot", zeroshot or {})]
    if heldout_batches:
        tables.append(("heldout_batches", heldout_batches))
    for section, table in tables:
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    lines.append("[fewshot]")
    for key, splits in (fewshot or {}).items():
        lines += ["", f"[fewshot.{_toml_key(key)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(list(v))}" for k, v in splits.items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ entry


def write_default_data(
    out_dir: str | Path,
    n_cells: int = 6000,
    n_genes: int = 1000,
    embed_dim: int = 64,
    n_source_cells: int = 6000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write both datasets, their TOMLs and the shared embedding map (PCA fitted on both domains pooled)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gp = make_gene_programs(n_genes, seed)
    wound = _simulate_wound(n_cells, gp, seed)
    source = _simulate_source(n_source_cells, gp, seed)
    # The map stands for a pretrained embedding (State's SE): fitted on the source domain and the wound cells that
    # train in both settings, never on a held-out cell type or mouse (docs/protocol.md).
    obs = wound.adata.obs
    seen = ~obs["cell_types_simple_short"].isin(list(ZEROSHOT)).to_numpy() & \
        ~obs["mouse_id"].isin(list(heldout_mice())).to_numpy()
    pooled = sp.vstack([wound.adata.layers["log1p"][np.flatnonzero(seen)], source.adata.layers["log1p"]]).toarray()
    emap = fit_embedding_map(pooled, gp.names, embed_dim)
    _attach_embedding(wound, emap)
    _attach_embedding(source, emap)
    paths = {
        "wound_healing": out / "wound_healing.h5ad",
        "source_perturbations": out / "source_perturbations.h5ad",
        "embedding_map": out / EMBEDDING_MAP_FILE,
        "wound_healing_toml": out / "wound_healing.toml",
        "wound_healing_mice_toml": out / "wound_healing_mice.toml",
        "source_perturbations_toml": out / "source_perturbations.toml",
    }
    np.savez(paths["embedding_map"], **emap)
    write_h5ad(wound.adata, paths["wound_healing"])
    write_h5ad(source.adata, paths["source_perturbations"])
    write_state_toml(
        paths["wound_healing_toml"],
        datasets={"wound_healing": paths["wound_healing"].name},
        training={"wound_healing": "train"},
        zeroshot={f"wound_healing.{ct}": split for ct, split in ZEROSHOT.items()},
    )
    write_state_toml(  # the users' own setting: every cell type trains, whole Burn mice are held out
        paths["wound_healing_mice_toml"],
        datasets={"wound_healing": paths["wound_healing"].name},
        training={"wound_healing": "train"},
        heldout_batches={f"wound_healing.{m}": split for m, split in heldout_mice().items()},
    )
    write_state_toml(
        paths["source_perturbations_toml"],
        datasets={"source_perturbations": paths["source_perturbations"].name},
        training={"source_perturbations": "train"},
        zeroshot={f"source_perturbations.{SOURCE_VAL_LINE}": "val"},
    )
    return paths


def use_true_velocity(path: str | Path) -> Path:
    """Give a generated file the simulation's true velocity where `stlib velocity` would write scvelo's.

    For checks that need velocity but not scvelo (a GPU machine without it) or a velocity without estimation error.
    """
    from stlib.constants import VELOCITY_CONFIDENCE_KEY, velocity_key
    from stlib.data.io import write_h5ad

    adata = ad.read_h5ad(path)
    adata.obsm[velocity_key(EMBED_KEY)] = adata.obsm[TRUE_VELOCITY_KEY].copy()
    adata.obs[VELOCITY_CONFIDENCE_KEY] = np.ones(adata.n_obs, dtype=np.float32)
    write_h5ad(adata, path)
    return Path(path)
