"""Weights: checkpoint reading (safetensors, block FP8), the name map, streaming loading, synthetic weights and
synthetic checkpoints. Entry points below; see each module for the contracts."""

from qnext.weights.loader import LoadReport, load_weights
from qnext.weights.name_map import checkpoint_layout, expected_parameters, map_name
from qnext.weights.safetensors_reader import SafetensorsCheckpoint, WeightError
from qnext.weights.synthetic import ParameterHolder, fill_synthetic_

__all__ = ["LoadReport", "ParameterHolder", "SafetensorsCheckpoint", "WeightError", "checkpoint_layout",
           "expected_parameters", "fill_synthetic_", "load_weights", "map_name"]
