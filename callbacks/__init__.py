"""Callbacks shared by every method (import path ``ctrlgen.callbacks.<Name>`` in YAML)."""

from ctrlgen.callbacks.checkpoint import RunCheckpoint
from ctrlgen.callbacks.data_health import DataHealthCallback
from ctrlgen.callbacks.ema import EMA
from ctrlgen.callbacks.histogram import StepValueHistogram, log_histogram
from ctrlgen.callbacks.hpc_prune import HPCCheckpointPrune, SafeRequeue
from ctrlgen.callbacks.images import ImageGridLogger, make_grid
from ctrlgen.callbacks.predictions import PredictionWriter
from ctrlgen.callbacks.results import TestResultsWriter
from ctrlgen.callbacks.rng import RNGStateCallback
from ctrlgen.callbacks.signals import GracefulStop
from ctrlgen.callbacks.throughput import ThroughputCallback
from ctrlgen.callbacks.wandb_config import WandbSaveConfig

__all__ = ["EMA", "DataHealthCallback", "GracefulStop", "HPCCheckpointPrune", "ImageGridLogger", "PredictionWriter",
           "RNGStateCallback", "RunCheckpoint", "SafeRequeue", "StepValueHistogram", "TestResultsWriter",
           "ThroughputCallback", "WandbSaveConfig", "log_histogram", "make_grid"]
