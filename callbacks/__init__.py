"""Callbacks shared by every method (import path ``callbacks.<Name>`` in YAML)."""

from callbacks.checkpoint import RunCheckpoint
from callbacks.data_health import DataHealthCallback
from callbacks.hpc_prune import HPCCheckpointPrune, SafeRequeue
from callbacks.images import ImageGridLogger, make_grid
from callbacks.predictions import PredictionWriter
from callbacks.results import TestResultsWriter
from callbacks.rng import RNGStateCallback
from callbacks.throughput import ThroughputCallback
from callbacks.wandb_config import WandbSaveConfig

__all__ = ["DataHealthCallback", "HPCCheckpointPrune", "ImageGridLogger", "PredictionWriter", "RNGStateCallback",
           "RunCheckpoint", "SafeRequeue", "TestResultsWriter", "ThroughputCallback", "WandbSaveConfig", "make_grid"]
