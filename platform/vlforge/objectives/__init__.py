"""Losses, each a plain function of model outputs and batch tensors.

``itc`` (symmetric InfoNCE over the global batch), ``itm`` (image-text matching
with hard negatives from ITC similarities), ``mlm`` (BERT masking and loss),
``mim`` (masked patch pixel regression), ``distillation`` (soft labels and
cross-modal attention KL), ``captioning`` (caption-token cross-entropy).
Nothing here imports Ray, DeepSpeed or MLflow.
"""
