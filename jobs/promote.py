"""Promote a registered model's challenger to champion when a fresh evaluation says it is better.

    python jobs/promote.py                            # vlforge-dual-encoder @challenger vs @champion (smoke config)
    python jobs/promote.py --dry-run                  # decide and print; record and move nothing
    python jobs/promote.py --challenger 4 --set improve.rmean=1.0
    python jobs/promote.py --rollback                 # the previous champion back
    ray job submit --working-dir . -- python jobs/promote.py --config jobs/configs/promote.yaml

Both versions are downloaded from the registry and scored on the same evaluation set
(retrieval for a dual encoder, captioning or few-shot VQA for a captioning model, each with
its own registered preprocessing). The challenger wins when
every `improve` metric gains its margin and no `guard` metric drops by more than its
tolerance; the first version becomes champion when there is none. The decision is written to
both versions (tags and description) before the alias moves. Exit code: 0 promoted, unchanged
or rolled back; 1 refused (the champion stays); 2 an error. See vlforge.serving.promotion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "promote_smoke.yaml"


def main(argv=None) -> int:
    from vlforge.cli.promote import promote_arguments, run_promote

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    promote_arguments(p, str(DEFAULT_CONFIG))
    return run_promote(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
