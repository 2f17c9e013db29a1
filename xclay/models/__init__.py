"""Encoders and their registry. Importing this package does not import torch."""

from xclay.model_card import ModelCard
from xclay.models.plugin import EncoderPlugin
from xclay.models.registry import ModelInfo, get_model, get_model_info, list_models, register_model
from xclay.sensors import get_sensor, list_platforms

__all__ = [
    "EncoderPlugin",
    "ModelCard",
    "ModelInfo",
    "get_model",
    "get_model_info",
    "get_sensor",
    "list_models",
    "list_platforms",
    "register_model",
]
