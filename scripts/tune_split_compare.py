"""Would the pass have been chosen the same way without reading the test split? Compares the UISPS
rows of the `tune` tables of two runs of the same variants, one scored on a validation split held
out of the training set (`validation` in the preset) and one on the test split; prints Markdown.

    python scripts/tune_split_compare.py docs/results/tune-validation-smallcnn docs/results/tune-test-smallcnn

A variant is ranked by its mean A_Dr among those that forget (mean A_Df at most 1 %, as the
issue's goal reads; ties keep the order of the tune variants); the first of that ranking is the
one each split would choose. Only variants both runs have are ranked; others are named.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FORGETS = 1.0  # mean A_Df (%) at or below which a variant counts as forgetting

Table = tuple[str, tuple[int, ...]]  # (arch, forget set)


def _rows(folder: Path) -> dict[tuple[Table, str], dict]:
    rows = json.loads((folder / "paper.json").read_text())
    return {((r["arch"], tuple(r["forget"])), r["setting"]): r
            for r in rows if r["experiment"] == "tune" and r["method"] == "uisps"}


def _ranks(rows: list[dict]) -> dict[str, int]:
    forgetting = [r for r in rows if r["acc_forget"] is not None and r["acc_forget"] <= FORGETS
                  and r["acc_retain"] is not None]
    ordered = sorted(forgetting, key=lambda r: -r["acc_retain"])
    return {r["setting"]: rank for rank, r in enumerate(ordered, 1)}


def _cell(row: dict, rank: int | None) -> str:
    spread = f" ± {row['acc_retain_std']:.2f}" if row["seeds"] > 1 else ""
    return f"{row['acc_retain']:.2f}{spread} | {row['acc_forget']:.2f} | {rank if rank else 'does not forget'}"


def _table(table: Table, on_val: dict, on_test: dict) -> list[str]:
    arch, forget = table
    settings = [s for t, s in on_val if t == table and (t, s) in on_test]
    lonely = sorted({s for t, s in [*on_val, *on_test] if t == table} - set(settings))
    val_rows, test_rows = ([rows[(table, s)] for s in settings] for rows in (on_val, on_test))
    val_ranks, test_ranks = _ranks(val_rows), _ranks(test_rows)
    seeds = sorted({r["seeds"] for r in [*val_rows, *test_rows]})
    lines = [f"{arch}, forget {list(forget)} (seeds: {', '.join(map(str, seeds))}):", "",
             "| variant | validation A_Dr | A_Df | rank | test A_Dr | A_Df | rank |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for setting, val, test in zip(settings, val_rows, test_rows):
        lines.append(f"| {setting} | {_cell(val, val_ranks.get(setting))} | {_cell(test, test_ranks.get(setting))} |")
    chosen = [min(ranks, key=ranks.__getitem__) if ranks else None for ranks in (val_ranks, test_ranks)]
    if chosen == [None, None]:
        verdict = "No variant forgets on either split."
    else:
        same = "the same" if chosen[0] == chosen[1] else "not the same"
        verdict = (f"Chosen on the validation split: {chosen[0] or 'none (no variant forgets)'}; "
                   f"on the test split: {chosen[1] or 'none (no variant forgets)'} ({same}).")
    lines += ["", verdict]
    if lonely:
        lines.append(f"In one run only, not ranked: {', '.join(lonely)}.")
    return [*lines, ""]


def compare(validation: Path, test: Path) -> str:
    on_val, on_test = _rows(validation), _rows(test)
    tables = sorted({t for t, _ in [*on_val, *on_test]}, key=lambda t: (t[0], len(t[1]), t[1]))
    return "\n".join(line for table in tables for line in _table(table, on_val, on_test))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    print(compare(Path(sys.argv[1]), Path(sys.argv[2])))
