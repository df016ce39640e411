"""stlib: fine-tune and compare State Transition (ST) perturbation models — LoRA, mHC, RNA-velocity alignment.

The public API; everything else is reachable through the submodules.
"""

import os

# The one place stlib sets a thread option: OpenMP threads that spin-wait stall when another process holds a
# core (a laptop, a CI runner, variants side by side), and sleeping waits cost little on an idle machine. It must
# be set before torch loads its OpenMP runtime, so `import stlib` comes before `import torch`; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stlib.config import Config, load_config
from stlib.errors import ConfigError, DataError, StlibError
from stlib.loading import load_any, load_model

__all__ = ["Config", "ConfigError", "DataError", "StlibError", "load_any", "load_config", "load_model"]
__version__ = "0.1.0"
