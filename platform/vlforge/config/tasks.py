"""The two words for "what is this for": a downstream *task* and a data *kind*.

A **task** is what a model is trained or scored for downstream: ``itm`` (image-text matching /
retrieval over captions), ``vqa`` (visual question answering) or ``nlvr2`` (a true/false statement
over a pair of images). ``StageConfig.task``, ``DistillationTask(task=...)``, the ``eval.sets`` keys
``"<task>/<split>"`` and metric names such as ``nlvr2_acc`` all use these names.

A data **kind** is what a shard set holds, as its ``manifest.json`` records it: ``captions``
(image-caption pairs), ``vqa`` (question + answers) or ``nlvr2`` (two images + a statement + a
label). The pipeline decodes a shard set by its kind. Each task reads one kind (``TASK_KIND``).

(The training wrappers in ``vlforge.tasks`` -- ``TrainTask`` and friends -- are a third thing;
they are named for the wrapper, not for either word here.)
"""

from __future__ import annotations

TASKS = ("itm", "vqa", "nlvr2")  # downstream tasks
FINETUNE_TASKS = ("vqa", "nlvr2")  # the classification tasks a fusion teacher is fine-tuned on
DATA_KINDS = ("captions", "vqa", "nlvr2")  # what a shard set holds
TASK_KIND = {"itm": "captions", "vqa": "vqa", "nlvr2": "nlvr2"}  # the data kind each task reads
