"""Single-device model code: VLMo, dual/fusion encoders, Frozen, VLKD, VC-GPT.

Nothing here imports Ray, DeepSpeed or MLflow (nor ``vlforge.tasks``); ``vlforge.tasks`` combines these with
their objectives and ``vlforge.train`` trains those tasks.
"""

from vlforge.models.registry import create_model, list_models, model_class, register_model

__all__ = ["create_model", "list_models", "model_class", "register_model"]
