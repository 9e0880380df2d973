"""VLMo stagewise pretraining: image-only MIM -> text-only MLM (attention and vision experts frozen) -> ITC + ITM + MLM.

    python jobs/vlmo_stagewise.py                                    # laptop: smoke sizes, 2 CPU workers
    python jobs/vlmo_stagewise.py --set name=my-run                  # the same name again resumes that run
    python jobs/vlmo_stagewise.py --set deepspeed.zero_stage=3 --set tracking.tracking_uri=http://127.0.0.1:5000
    ray job submit --working-dir . -- python jobs/vlmo_stagewise.py --config jobs/configs/vlmo_stagewise.yaml

Runs every stage of the config on Ray Train + DeepSpeed (see vlforge.train.runner),
logs to MLflow, exports fp32 safetensors, and prints per-stage first/last losses.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from vlforge.train.runner import job_main

    return job_main(__doc__, "jobs/configs/vlmo_stagewise_smoke.yaml", argv)


if __name__ == "__main__":
    sys.exit(main())
