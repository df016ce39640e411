"""stlib.models: the State Transition model, its set transformer backbone, and State checkpoint loading."""

from stlib.models.backbone import SetTransformer
from stlib.models.state_checkpoint import StateCheckpointError, StateRun, is_state_run_dir, load_state_run
from stlib.models.state_transition import StateTransitionModel

__all__ = [
    "SetTransformer",
    "StateCheckpointError",
    "StateRun",
    "StateTransitionModel",
    "is_state_run_dir",
    "load_state_run",
]
