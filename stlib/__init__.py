"""stlib: fine-tune and compare State Transition (ST) perturbation models — LoRA, mHC, RNA-velocity alignment.

The public API; everything else is reachable through the submodules.
"""

from stlib.config import Config, ConfigError, load_config
from stlib.models.loading import load_any, load_model

__all__ = ["Config", "ConfigError", "load_any", "load_config", "load_model"]
__version__ = "0.1.0"
