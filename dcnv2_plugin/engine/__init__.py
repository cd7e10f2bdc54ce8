"""Training and evaluation: the trainer, config set-up and launch that
`train_net.py` uses."""

from .checkpoint import CheckpointError, VerifiedCheckpointer
from .launch import launch
from .train_net import main, parse_args, run, setup
from .trainer import Trainer

__all__ = ["CheckpointError", "Trainer", "VerifiedCheckpointer", "launch", "main", "parse_args", "run", "setup"]
