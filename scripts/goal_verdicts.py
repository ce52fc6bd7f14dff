"""Issue #4's five goals judged for the UISPS rows of `main` tables; prints a Markdown table.

    python scripts/goal_verdicts.py docs/results/main-smallcnn docs/results/main-allcnn-one-class-cpu

Reads each folder's paper.json (means over seeds). For every (arch, forget set) of the `main`
experiment that holds an Original, a Retrain and UISPS rows, each UISPS row (the default pass and
`preset=paper`) is judged against the goals of the issue:

- A_Df 0.00;
- A_Dr at most 1.0 point below Retrain's;
- A_Dr at least 1.0 point above the best zero-glance baseline that reaches A_Df <= 1 % (the
  head-mask control is no baseline: it hides the classes, and its A_Dr is the Original's);
- MIA no higher than Retrain's;
- probe (plain accuracy, as the issue names it) at or below, and relearn steps at or above, the
  midpoint of the Original's and Retrain's.

A relearn figure whose seeds hit the step cap (`relearn_capped`) is a lower bound; the cell says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARGIN = 1.0  # points: the A_Dr goals, against Retrain and against the best baseline
FORGETS = 1.0  # percent: a baseline "reaches A_Df <= 1 %"
NOT_BASELINES = {"original", "retrain", "head_mask"}


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _best_baseline(table: list[dict]) -> dict | None:
    candidates = [r for r in table if r["zero_glance"] and r["method"] not in NOT_BASELINES
                  and not r["method"].startswith("uisps") and r["acc_forget"] <= FORGETS]
    return max(candidates, key=lambda r: r["acc_retain"], default=None)


def _capped(row: dict) -> str:
    return f" ({row['relearn_capped']} capped)" if row.get("relearn_capped") else ""


def _cells(row: dict, original: dict, retrain: dict, baseline: dict | None) -> list[str]:
    behind = row["acc_retain"] - retrain["acc_retain"]
    if baseline is None:
        margin_cell = "no zero-glance baseline forgets"
    else:
        margin = row["acc_retain"] - baseline["acc_retain"]
        margin_cell = f"{margin:+.2f} over {baseline['method']}: {_met(margin >= MARGIN)}"
    probe_mid = (original["probe"] + retrain["probe"]) / 2
    relearn_mid = (original["relearn_steps"] + retrain["relearn_steps"]) / 2
    return [
        f"{row['acc_forget']:.2f}: {_met(row['acc_forget'] < 0.005)}",  # 0.00 as printed
        f"{behind:+.2f}: {_met(behind >= -MARGIN)}",
        margin_cell,
        f"{row['mia']:.2f} / {retrain['mia']:.2f}: {_met(row['mia'] <= retrain['mia'])}",
        f"{row['probe']:.2f} / {probe_mid:.2f}: {_met(row['probe'] <= probe_mid)}",
        f"{row['relearn_steps']:.1f}{_capped(row)} / {relearn_mid:.1f}{_capped(retrain)}: "
        f"{_met(row['relearn_steps'] >= relearn_mid)}",
    ]


def verdicts(folder: Path) -> list[str]:
    """One Markdown line per UISPS row of the folder's `main` tables."""
    rows = [r for r in json.loads((folder / "paper.json").read_text()) if r["experiment"] == "main"]
    lines = []
    for arch, forget in sorted({(r["arch"], tuple(r["forget"])) for r in rows}):
        table = [r for r in rows if (r["arch"], tuple(r["forget"])) == (arch, forget)]
        ends = {r["method"]: r for r in table if r["method"] in ("original", "retrain")}
        if len(ends) < 2:
            continue
        baseline = _best_baseline(table)
        for row in (r for r in table if r["method"].startswith("uisps")):
            cells = _cells(row, ends["original"], ends["retrain"], baseline)
            lines.append(f"| `{folder.name}` | {arch} | {','.join(map(str, forget))} | {row['setting']} | "
                         f"{row['seeds']} | {' | '.join(cells)} |")
    return lines


HEADER = ("| folder | arch | forget | setting | seeds | A_Df = 0 | A_Dr - Retrain (>= -1) | "
          "A_Dr - best baseline (>= +1) | MIA / Retrain's | probe / midpoint | relearn / midpoint |")


def main(folders: list[str]) -> None:
    print(HEADER)
    print("| " + " | ".join(["---"] * (HEADER.count("|") - 1)) + " |")
    for folder in folders:
        for line in verdicts(Path(folder)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
