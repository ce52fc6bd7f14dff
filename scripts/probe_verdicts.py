"""The feature-probe goal (closer to Retrain than to the Original) judged on the probe's plain and
on its balanced accuracy, for the UISPS rows of result folders; prints a Markdown table.

    python scripts/probe_verdicts.py docs/results/main-allcnn-one-class-cpu docs/results/depth-*-cpu

Reads each folder's paper.json (means over seeds); a row meets the goal where its figure is
nearer its table's Retrain than its Original (on Retrain's side of their midpoint, whichever side
that is); "at it" (at the midpoint, as printed) does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _verdicts(folder: Path) -> list[str]:
    rows = json.loads((folder / "paper.json").read_text())
    lines = []
    for table in sorted({(r["experiment"], r["arch"], tuple(r["forget"])) for r in rows}):
        same = [r for r in rows if (r["experiment"], r["arch"], tuple(r["forget"])) == table]
        ends = {r["method"]: r for r in same if r["method"] in ("original", "retrain")}
        if len(ends) < 2:
            continue
        for row in (r for r in same if r["method"].startswith("uisps")):
            cells = []
            for key in ("probe", "probe_balanced"):
                midpoint = (ends["original"][key] + ends["retrain"][key]) / 2
                closer = abs(row[key] - ends["retrain"][key]) < abs(row[key] - ends["original"][key])
                met = "at it" if abs(row[key] - midpoint) < 0.005 else "met" if closer else "not met"
                cells.append(f"{row[key]:.2f} / {midpoint:.2f}: {met}")
            lines.append(f"| `{folder.name}` | {table[1]} | {','.join(map(str, table[2]))} | {row['setting']} | "
                         f"{row['seeds']} | {' | '.join(cells)} |")
    return lines


def main(folders: list[str]) -> None:
    print("| folder | arch | forget | setting | seeds | probe / midpoint | probe (bal.) / midpoint |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for folder in folders:
        for line in _verdicts(Path(folder)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
