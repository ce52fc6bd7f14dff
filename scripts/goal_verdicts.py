"""Issue #4's five goals judged for the UISPS rows of `main` tables; prints a Markdown table.

    python scripts/goal_verdicts.py docs/results/main-smallcnn docs/results/main-allcnn-one-class-cpu
    python scripts/goal_verdicts.py docs/results/main-allcnn-one-class-cpu+<a later run of some baselines>

Reads each folder's paper.json (means over seeds). `BASE+EXTRA[+EXTRA...]` (paths without a
"+") reads BASE with each EXTRA's baseline rows (not its Original, Retrain or UISPS rows) in place
of BASE's rows of the same method and setting, or beside them (a later run of some baselines, or
of one at other settings), and only where the runs trained the same Originals: every seed of a
baseline row in EXTRA's paper-raw.jsonl needs its Original row there, equal to BASE's to the last
digit, or the script refuses (rows of other models do not compare). For every (arch, forget set)
of the `main` experiment that holds an Original, a Retrain and UISPS rows, each UISPS row (the
default pass and `preset=paper`) is judged against the goals of the issue:

- A_Df 0.00;
- A_Dr at most 1.0 point below Retrain's;
- A_Dr at least 1.0 point above the best zero-glance baseline that reaches A_Df <= 1 % (the
  head-mask control is no baseline: it hides the classes while every feature still knows them);
- MIA no higher than Retrain's;
- probe (plain accuracy, as the issue names it) and relearn steps closer to Retrain's than to the
  Original's: on Retrain's side of their midpoint (the cell shows it); a figure at the midpoint,
  as printed, is as close to either and is not met.

A relearn figure whose seeds hit the step cap (`relearn_capped`) is a lower bound; the cell says so,
and gives no verdict where the bound could turn it (a row "met" against a capped Retrain, a capped
row "not met"). A measure a row lacks is "no figure".
The seeds cell says where the rows compared are not means over the same seeds, or over fewer than
the issue's 3 (first figures, not verdicts); the margin cell names the baselines the run planned
(its paper-run.json) that have no row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARGIN = 1.0  # points: the A_Dr goals, against Retrain and against the best baseline
FORGETS = 1.0  # percent: a baseline "reaches A_Df <= 1 %"


def _is_baseline(method: str) -> bool:
    """Neither an end of the comparison (Original, Retrain) nor UISPS; the head-mask control is
    one here, though never the best baseline: it hides the classes without forgetting them."""
    return method not in ("original", "retrain") and not method.startswith("uisps")


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _best_baseline(table: list[dict]) -> dict | None:
    candidates = [r for r in table if r["zero_glance"] and _is_baseline(r["method"])
                  and r["method"] != "head_mask" and r["acc_forget"] <= FORGETS]
    return max(candidates, key=lambda r: r["acc_retain"], default=None)


def _capped(row: dict) -> str:
    return f" ({row['relearn_capped']} capped)" if row.get("relearn_capped") else ""


def _closer_to_retrain(key: str, digits: int, row: dict, original: dict, retrain: dict) -> str:
    """`x / midpoint: verdict`, whichever side of the midpoint Retrain lies on."""
    if any(r.get(key) is None for r in (row, original, retrain)):
        return "-: no figure"
    value, mid = row[key], (original[key] + retrain[key]) / 2
    text = f"{value:.{digits}f}{_capped(row) if key == 'relearn_steps' else ''} / {mid:.{digits}f}"
    if key == "relearn_steps":
        text += _capped(retrain)
    if round(value, digits) == round(mid, digits):
        return f"{text}: at it, **not met**"
    met = abs(value - retrain[key]) < abs(value - original[key])
    # a capped figure is a lower bound: Retrain's true midpoint may lie past a "met", and the
    # row's true figure past a "not met"
    if key == "relearn_steps" and ((met and retrain.get("relearn_capped")) or (not met and row.get("relearn_capped"))):
        return f"{text}: lower bound, no verdict"
    return f"{text}: {_met(met)}"


def _seeds_cell(row: dict, compared: dict[str, dict]) -> str:
    """The row's seeds, and where the rows it is compared with averaged other seeds, or too few."""
    def same_seeds(r: dict) -> bool:
        # rows of runs before `seed_ids` say only how many (a merged table mixes both kinds)
        if "seed_ids" in r and "seed_ids" in row:
            return r["seed_ids"] == row["seed_ids"]
        return r["seeds"] == row["seeds"]

    cell = str(row["seeds"])
    differ = [f"{name}: {r['seeds']}" for name, r in compared.items() if not same_seeds(r)]
    if differ:
        cell += f" (other seeds: {', '.join(differ)})"
    if row["seeds"] < 3:
        cell += " (fewer than 3: first figures)"
    return cell


def _cells(row: dict, original: dict, retrain: dict, baseline: dict | None, not_run: list[str]) -> list[str]:
    behind = row["acc_retain"] - retrain["acc_retain"]
    missing = f" ({', '.join(not_run)}: no row)" if not_run else ""
    if baseline is None:
        margin_cell = f"no zero-glance baseline forgets{missing}"
    else:
        margin = row["acc_retain"] - baseline["acc_retain"]
        which = baseline["method"] + ("" if baseline["setting"] == "default" else f" {baseline['setting']}")
        margin_cell = f"{margin:+.2f} over {which}{missing}: {_met(margin >= MARGIN)}"
    return [
        f"{row['acc_forget']:.2f}: {_met(row['acc_forget'] < 0.005)}",  # 0.00 as printed
        f"{behind:+.2f}: {_met(behind >= -MARGIN)}",
        margin_cell,
        f"{row['mia']:.2f} / {retrain['mia']:.2f}: {_met(row['mia'] <= retrain['mia'])}",
        _closer_to_retrain("probe", 2, row, original, retrain),
        _closer_to_retrain("relearn_steps", 1, row, original, retrain),
    ]


def _planned_methods(folder: Path) -> list[str]:
    run = folder / "paper-run.json"
    return json.loads(run.read_text()).get("preset", {}).get("main_methods", []) if run.exists() else []


_ROW_KEY = ("experiment", "arch", "forget", "method", "setting")
# what an Original row measured: equal in both runs only if both trained the same weights
_ORIGINAL_MEASURES = ("acc_retain", "acc_forget", "mia", "probe", "probe_balanced", "relearn_steps",
                      "forget_histogram")


def _key(row: dict) -> tuple:
    return tuple(tuple(row[k]) if isinstance(row[k], list) else row[k] for k in _ROW_KEY)


def _model_key(row: dict) -> tuple:
    """The trained model a raw row started from: its table and seed."""
    return row["experiment"], row["arch"], tuple(row["forget"]), row["seed"]


def _raw_rows(folder: Path) -> list[dict]:
    """The finished raw rows; a last line cut short (a run stopped mid-write, not yet resumed) is
    left out, as `--resume` leaves it, since it is a row that has not finished."""
    lines = (folder / "paper-raw.jsonl").read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < last:
                raise SystemExit(f"{folder}: line {i + 1} of paper-raw.jsonl is not JSON") from None
            print(f"{folder}: the last line of paper-raw.jsonl was cut short; left out", file=sys.stderr)
    return rows


def _check_same_originals(base: Path, extra: Path) -> None:
    """Refuse to merge runs unless every baseline row EXTRA ran, seed by seed, started from an
    Original that BASE trained too, equal to the last digit."""
    mine = {_model_key(r): r for r in _raw_rows(base) if r["method"] == "original"}
    raw = _raw_rows(extra)
    theirs = {_model_key(r): r for r in raw if r["method"] == "original"}
    if not theirs:
        raise SystemExit(f"{extra}: no Original rows in paper-raw.jsonl to check against {base}'s")
    for key, row in theirs.items():
        other = mine.get(key)
        if other is None:
            raise SystemExit(f"{base} has no Original for {key}: {extra}'s rows are of models it did not judge")
        differ = [m for m in _ORIGINAL_MEASURES if row.get(m) != other.get(m)]
        if differ:
            raise SystemExit(f"{extra} and {base} trained different Originals ({key}: {', '.join(differ)} differ): "
                             "their rows do not compare")
    for row in (r for r in raw if _is_baseline(r["method"])):
        if _model_key(row) not in theirs:
            raise SystemExit(f"{extra}: {row['method']} {row['setting']} seed {row['seed']} has no Original row "
                             f"to check against {base}'s")


def _with_seed_ids(rows: list[dict], folder: Path) -> list[dict]:
    """Rows of runs before paper.json named its seeds, given them from paper-raw.jsonl."""
    raw_path = folder / "paper-raw.jsonl"
    if all("seed_ids" in r for r in rows) or not raw_path.exists():
        return rows
    seeds: dict[tuple, list[int]] = {}
    for r in _raw_rows(folder):
        seeds.setdefault(_key(r), []).append(r["seed"])
    return [r if "seed_ids" in r or _key(r) not in seeds else {**r, "seed_ids": sorted(set(seeds[_key(r)]))}
            for r in rows]


def _shown(folder: Path) -> str:
    """The folder as the results page names it: its path below docs/results (or its own name)."""
    parts = folder.parts[:-1]
    if "results" not in parts:
        return folder.name
    return "/".join(folder.parts[len(parts) - parts[::-1].index("results"):])


def _rows_and_name(spec: str) -> tuple[list[dict], str, Path]:
    """A folder's rows, or BASE's with each EXTRA's baseline rows in place of the same method and
    setting or beside them (EXTRA's Original, Retrain and UISPS rows are not read)."""
    base, *extras = spec.split("+")
    folder = Path(base)
    rows = _with_seed_ids(json.loads((folder / "paper.json").read_text()), folder)
    name = f"`{_shown(folder)}`"
    for extra in map(Path, extras):
        _check_same_originals(folder, extra)
        replacing = [r for r in json.loads((extra / "paper.json").read_text()) if _is_baseline(r["method"])]
        keys = {_key(r) for r in replacing}
        rows = [r for r in rows if _key(r) not in keys] + replacing
        settings = ", ".join(sorted({f"{r['method']} {r['setting']}" for r in replacing}))
        name += f" + {settings} of `{extra.name if extra.parent == folder.parent else _shown(extra)}`"
    return rows, name, folder


def verdicts(spec: Path | str) -> list[str]:
    """One Markdown line per UISPS row of the folder's (or BASE+EXTRA's) `main` tables."""
    all_rows, name, folder = _rows_and_name(str(spec))
    rows = [r for r in all_rows if r["experiment"] == "main"]
    planned = _planned_methods(folder)
    lines = []
    for arch, forget in sorted({(r["arch"], tuple(r["forget"])) for r in rows}):
        table = [r for r in rows if (r["arch"], tuple(r["forget"])) == (arch, forget)]
        ends = {r["method"]: r for r in table if r["method"] in ("original", "retrain")}
        if len(ends) < 2:
            continue
        baseline = _best_baseline(table)
        present = {r["method"] for r in table}
        not_run = [m for m in planned if m not in present and _is_baseline(m) and m != "head_mask"]
        compared = {**ends, **({baseline["method"]: baseline} if baseline else {})}
        for row in (r for r in table if r["method"].startswith("uisps")):
            cells = _cells(row, ends["original"], ends["retrain"], baseline, not_run)
            lines.append(f"| {name} | {arch} | {','.join(map(str, forget))} | {row['setting']} | "
                         f"{_seeds_cell(row, compared)} | {' | '.join(cells)} |")
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
