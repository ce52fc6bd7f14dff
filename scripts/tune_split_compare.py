"""Would the pass have been chosen the same way without reading the test split? Compares the UISPS
rows of two `tune` runs of the same variants, one scored on a validation split held out of the
training set (`validation` in the preset) and one on the test split; prints a Markdown table.

    python scripts/tune_split_compare.py docs/results/tune-validation-smallcnn docs/results/tune-test-smallcnn

A variant is ranked by its A_Dr among those that forget (mean A_Df at most 1 %, as the issue's
goal reads); the first of that ranking is the one each split would choose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FORGETS = 1.0  # mean A_Df (%) at or below which a variant counts as forgetting


def _rows(folder: Path) -> dict[tuple, dict]:
    rows = json.loads((folder / "paper.json").read_text())
    return {(tuple(r["forget"]), r["setting"]): r for r in rows if r["method"] == "uisps"}


def _ranks(rows: dict[tuple, dict], forget: tuple) -> dict[str, int]:
    forgetting = [r for (f, _), r in rows.items() if f == forget and r["acc_forget"] <= FORGETS]
    ordered = sorted(forgetting, key=lambda r: -r["acc_retain"])
    return {r["setting"]: rank for rank, r in enumerate(ordered, 1)}


def _cell(row: dict | None, rank: int | None) -> str:
    if row is None:
        return "- | - | -"
    spread = f" ± {row['acc_retain_std']:.2f}" if row["seeds"] > 1 else ""
    return f"{row['acc_retain']:.2f}{spread} | {row['acc_forget']:.2f} | {rank if rank else 'does not forget'}"


def compare(validation: Path, test: Path) -> str:
    on_val, on_test = _rows(validation), _rows(test)
    lines = []
    for forget in sorted({f for f, _ in on_val} | {f for f, _ in on_test}, key=len):
        val_ranks, test_ranks = _ranks(on_val, forget), _ranks(on_test, forget)
        seeds = {r["seeds"] for rows in (on_val, on_test) for (f, _), r in rows.items() if f == forget}
        lines += [f"Forget {list(forget)} (seeds: {', '.join(map(str, sorted(seeds)))}):", "",
                  "| variant | validation A_Dr | A_Df | rank | test A_Dr | A_Df | rank |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        settings = [s for f, s in on_val if f == forget] + [s for f, s in on_test if f == forget and (f, s) not in on_val]
        for setting in settings:
            lines.append(f"| {setting} | {_cell(on_val.get((forget, setting)), val_ranks.get(setting))} | "
                         f"{_cell(on_test.get((forget, setting)), test_ranks.get(setting))} |")
        chosen = [min(ranks, key=ranks.get) if ranks else None for ranks in (val_ranks, test_ranks)]
        verdict = "the same" if chosen[0] == chosen[1] else "not the same"
        lines += ["", f"Chosen on the validation split: {chosen[0]}; on the test split: {chosen[1]} ({verdict}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    print(compare(Path(sys.argv[1]), Path(sys.argv[2])))
