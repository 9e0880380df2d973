"""Single-device model code: VLMo, dual/fusion encoders, Frozen, VLKD, VC-GPT.

Nothing here imports Ray, DeepSpeed or MLflow; ``vlforge.train`` wraps these.
"""

from vlforge.models.registry import create_model, list_models, model_class, register_model

__all__ = ["create_model", "list_models", "model_class", "register_model"]
