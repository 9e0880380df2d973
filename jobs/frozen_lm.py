"""Frozen: train a vision encoder + visual prefix against a frozen causal language model (captioning loss).

    python jobs/frozen_lm.py                                    # laptop: smoke sizes, built-in corpus, 2 CPU workers
    python jobs/frozen_lm.py --set name=my-run                  # the same name again resumes that run
    python jobs/frozen_lm.py --set name=frozen-lm-ft --set 'stages.0.trainable=["vision.*","prefix.*","lm.*"]'
                                                                # the paper's control: the LM fine-tuned too
    python jobs/frozen_lm.py --set deepspeed.zero_stage=3 --set tracking.tracking_uri=http://127.0.0.1:5000
    ray job submit --working-dir . -- python jobs/frozen_lm.py --config jobs/configs/frozen_lm.yaml

Runs every stage of the config on Ray Train + DeepSpeed (see vlforge.train.runner),
logs to MLflow, exports fp32 safetensors, and prints per-stage first/last losses.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from vlforge.train.runner import job_main

    return job_main(__doc__, "jobs/configs/frozen_lm_smoke.yaml", argv)


if __name__ == "__main__":
    sys.exit(main())
