"""VLKD: a BART student distilled from a frozen vlforge dual encoder (text-text distance, image-text
contrastive, image-conditioned infilling); captions from the image alone after.

    python jobs/vlkd.py                                        # laptop: smoke sizes, built-in corpus, 2 CPU workers
    python jobs/vlkd.py --set stages.0.steps=300 --set name=my-run   # the same name again resumes that run
    ray job submit --working-dir . -- python jobs/vlkd.py --config jobs/configs/vlkd.yaml
    vlforge eval out/ray_results/<name>/export data/corpus/scenes/test     # BLEU-4, ROUGE-L, CIDEr, objects named

Runs every stage of the config on Ray Train + DeepSpeed (see vlforge.train.runner), logs to
MLflow, exports fp32 safetensors, and prints per-stage first/last losses.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from vlforge.train.runner import job_main

    return job_main(__doc__, "jobs/configs/vlkd_smoke.yaml", argv)


if __name__ == "__main__":
    sys.exit(main())
