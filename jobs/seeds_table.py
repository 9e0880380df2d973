"""Mean and spread over seeds of two-stage job results: one row per model and split.

    python jobs/seeds_table.py out/two_stage/s0 out/two_stage/s1 out/two_stage/s2
    python jobs/seeds_table.py out/two_stage/s* --metrics nlvr2_acc vqa_acc rmean

Reads each job directory's results.json (written by jobs/two_stage.py) and prints
`mean ± sample std (n)` for every metric.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_METRICS = ["nlvr2_acc", "vqa_acc", "i2t_r1", "t2i_r1", "rmean"]


def aggregate(dirs: list[Path], metrics: list[str]) -> list[dict]:
    from vlforge.evaluation import mean_std

    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for d in dirs:
        path = d / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no results (is {d} a finished two-stage job directory?)")
        for row in json.loads(path.read_text())["rows"]:
            cell = values.setdefault((row["model"], row["split"]), {})
            for m in metrics:
                if isinstance(row.get(m), (int, float)):
                    cell.setdefault(m, []).append(float(row[m]))
    rows = []
    for (model, split), cell in values.items():
        row = {"model": model, "split": split}
        for m in metrics:
            if m in cell:
                mean, std = mean_std(cell[m])
                row[m] = f"{mean:.1f} ± {std:.1f} ({len(cell[m])})"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dirs", nargs="+", type=Path, help="two-stage job directories (<storage_path>/<name>)")
    p.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    args = p.parse_args(argv)
    from vlforge.evaluation import format_table

    try:
        rows = aggregate(args.dirs, args.metrics)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, ["model", "split", *args.metrics], title=f"mean ± std over {len(args.dirs)} runs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
