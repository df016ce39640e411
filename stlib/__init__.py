"""stlib: fine-tune and compare State Transition (ST) perturbation models — LoRA, mHC, RNA-velocity alignment.

The public API; everything else is reachable through the submodules.
"""

import os

# OpenMP threads that spin-wait stall when another process holds a core (a shared laptop, a CI runner, several
# variants side by side): measured 4x slower steps at 2 threads. Sleeping waits cost little when the machine is
# idle. Must be set before torch loads its OpenMP runtime; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stlib.config import Config, ConfigError, load_config
from stlib.models.loading import load_any, load_model

__all__ = ["Config", "ConfigError", "load_any", "load_config", "load_model"]
__version__ = "0.1.0"
