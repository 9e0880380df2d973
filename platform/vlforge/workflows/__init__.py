"""End-to-end flows that combine training, evaluation and tracking; the jobs in ``jobs/`` call these.

* ``two_stage``: teacher pretraining and fine-tuning, two-stage distillation of a dual-encoder
  student with its ablations, evaluation, latency, registration (``jobs/two_stage.py``).
* ``embed``: batch inference with a registered model: a shard set -> Ray Data -> image and text
  embeddings in Parquet (``jobs/embed.py``).
"""
