"""scripts/goal_verdicts.py: the issue's goals judged for the UISPS rows of `main` tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("goal_verdicts", Path(__file__).parents[2] / "scripts" / "goal_verdicts.py")
goal_verdicts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(goal_verdicts)


def _row(method: str, a_dr: float, a_df: float, *, mia: float = 20.0, probe: float = 85.0, relearn: float = 10.0,
         zero_glance: bool = True, experiment: str = "main", setting: str = "default", **extra: object) -> dict:
    return {"experiment": experiment, "arch": "resnet18", "forget": [0], "method": method, "setting": setting,
            "seeds": 3, "acc_retain": a_dr, "acc_forget": a_df, "mia": mia, "probe": probe, "relearn_steps": relearn,
            "zero_glance": zero_glance, **extra}


def _folder(tmp_path: Path, *rows: dict) -> Path:
    folder = tmp_path / "main-run"
    folder.mkdir(parents=True)
    (folder / "paper.json").write_text(json.dumps(list(rows)))
    return folder


ENDS = (_row("original", 80.0, 75.0, mia=80.0, probe=93.0, relearn=0.0),
        _row("retrain", 80.0, 0.0, mia=30.0, probe=87.0, relearn=20.0))


def test_a_row_that_meets_every_goal_reads_met_in_every_cell(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("fisher", 78.5, 0.5),
                     _row("uisps", 79.6, 0.0, mia=25.0, probe=89.0, relearn=12.0))

    (line,) = goal_verdicts.verdicts(folder)

    assert line == ("| `main-run` | resnet18 | 0 | default | 3 | 0.00: met | -0.40: met | +1.10 over fisher: met | "
                    "25.00 / 30.00: met | 89.00 / 90.00: met | 12.0 / 10.0: met |")


def test_the_best_baseline_is_a_zero_glance_method_that_forgets_never_the_head_mask(tmp_path: Path) -> None:
    # head-mask hides the class at the Original's A_Dr; Amnesiac reads the forget set; fine-tune keeps it
    folder = _folder(tmp_path, *ENDS, _row("head_mask", 80.0, 0.0), _row("amnesiac", 79.5, 0.0, zero_glance=False),
                     _row("finetune", 79.0, 4.0), _row("unsir", 77.0, 1.0), _row("fisher", 76.0, 0.0),
                     _row("uisps", 77.5, 0.0))

    (line,) = goal_verdicts.verdicts(folder)

    assert "| +0.50 over unsir: **not met** |" in line


def test_goals_missed_are_each_said_so(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("uisps", 78.5, 2.0, mia=31.0, probe=92.0, relearn=3.0))

    (line,) = goal_verdicts.verdicts(folder)

    assert line.split(" | ")[5:] == ["2.00: **not met**", "-1.50: **not met**", "no zero-glance baseline forgets",
                                     "31.00 / 30.00: **not met**", "92.00 / 90.00: **not met**",
                                     "3.0 / 10.0: **not met** |"]


def test_a_relearn_figure_that_hit_the_cap_is_marked_and_judged_only_where_the_bound_cannot_turn_it(
    tmp_path: Path,
) -> None:
    capped_retrain = dict(ENDS[1], relearn_steps=200.0, relearn_capped=2)
    capped_row = _row("uisps", 80.0, 0.0, relearn=20.0, relearn_capped=1)
    cases = [
        # Retrain's true figure, and so the midpoint, may be higher than printed
        (capped_retrain, _row("uisps", 80.0, 0.0, relearn=150.0), "150.0 / 100.0 (2 capped): lower bound, no verdict"),
        (capped_retrain, _row("uisps", 80.0, 0.0, relearn=50.0), "50.0 / 100.0 (2 capped): **not met**"),
        (ENDS[1], capped_row, "20.0 (1 capped) / 10.0: met"),
        (ENDS[1], dict(capped_row, relearn_steps=5.0), "5.0 (1 capped) / 10.0: lower bound, no verdict"),
    ]
    for i, (retrain, row, cell) in enumerate(cases):
        folder = _folder(tmp_path / str(i), ENDS[0], retrain, row)
        (line,) = goal_verdicts.verdicts(folder)
        assert line.endswith(f"| {cell} |"), line


def test_a_row_without_a_measure_says_no_figure(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("uisps", 80.0, 0.0, relearn=None))

    (line,) = goal_verdicts.verdicts(folder)

    assert line.endswith("| -: no figure |")


def test_only_main_tables_with_both_ends_are_judged(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("uisps", 80.0, 0.0, experiment="tune"),
                     _row("original", 80.0, 75.0, experiment="main") | {"forget": [1]},
                     _row("uisps", 80.0, 0.0) | {"forget": [1]},
                     _row("uisps-paper", 70.0, 9.0, setting="preset=paper"))

    lines = goal_verdicts.verdicts(folder)

    assert len(lines) == 1 and "| preset=paper |" in lines[0]


def test_a_figure_at_the_midpoint_is_as_close_to_the_original_and_is_not_met(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("uisps", 80.0, 0.0, probe=90.0, relearn=10.0))

    (line,) = goal_verdicts.verdicts(folder)

    assert line.split(" | ")[-2:] == ["90.00 / 90.00: at it, **not met**", "10.0 / 10.0: at it, **not met** |"]


def test_closer_to_retrain_is_judged_whichever_side_of_the_original_retrain_lies(tmp_path: Path) -> None:
    # a Retrain whose probe is above the Original's: a low probe is then the Original's side
    original = dict(ENDS[0], probe=85.0)
    retrain = dict(ENDS[1], probe=91.0)
    folder = _folder(tmp_path, original, retrain, _row("uisps", 80.0, 0.0, probe=87.0))

    (line,) = goal_verdicts.verdicts(folder)

    assert "| 87.00 / 88.00: **not met** |" in line


def test_rows_over_other_or_too_few_seeds_are_said_so(tmp_path: Path) -> None:
    original = dict(ENDS[0], seeds=3, seed_ids=[0, 1, 2])
    retrain = dict(ENDS[1], seeds=2, seed_ids=[0, 1])
    folder = _folder(tmp_path, original, retrain, _row("uisps", 80.0, 0.0, seeds=2, seed_ids=[0, 1]))

    (line,) = goal_verdicts.verdicts(folder)

    assert "| 2 (other seeds: original: 3) (fewer than 3: first figures) |" in line


def test_baselines_the_run_planned_but_did_not_finish_are_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path, *ENDS, _row("unsir", 78.0, 0.0), _row("uisps", 79.6, 0.0))
    (folder / "paper-run.json").write_text(json.dumps(
        {"preset": {"main_methods": ["original", "retrain", "uisps", "unsir", "bad_teacher", "head_mask"]}}))

    (line,) = goal_verdicts.verdicts(folder)

    assert "| +1.60 over unsir (bad_teacher: no row): met |" in line


def _raw(folder: Path, *rows: dict) -> None:
    (folder / "paper-raw.jsonl").write_text("".join(json.dumps(dict(r, seed=0)) + "\n" for r in rows))


def _later_run(tmp_path: Path, original: dict, *rows: dict) -> Path:
    folder = tmp_path / "later-run"
    folder.mkdir()
    (folder / "paper.json").write_text(json.dumps([original, *rows]))
    _raw(folder, original, *rows)
    return folder


def test_a_later_run_of_a_baseline_on_the_same_originals_takes_its_rows_place(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("fisher", 79.0, 0.0), _row("unsir", 77.0, 0.0), _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 60.0, 0.0))

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert line.startswith("| `main-run` + fisher default of `later-run` | resnet18 |")
    assert "| +2.60 over unsir: met |" in line  # the earlier fisher row (79.0) is gone


def test_a_baseline_at_other_settings_joins_the_rows_and_is_named_with_them(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("fisher", 60.0, 0.0), _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 79.0, 0.0, setting="alpha=1e-08"))

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert line.startswith("| `main-run` + fisher alpha=1e-08 of `later-run` | resnet18 |")
    assert "| +0.60 over fisher alpha=1e-08: **not met** |" in line


def test_a_baseline_at_other_settings_leaves_the_default_row_in_place(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("fisher", 79.2, 0.0), _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 79.0, 0.0, setting="alpha=1e-08"))

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert "| +0.40 over fisher: **not met** |" in line


@pytest.mark.parametrize(("original_seed", "fisher_seed", "refusal"), [
    (None, 0, "no Original rows"),  # nothing to check the later run's models by
    (0, 1, "fisher default seed 1 has no Original row"),  # a seed of the baseline whose Original is not there
    (4, 4, "has no Original for"),  # an Original the base never trained
])
def test_a_later_run_whose_models_cannot_be_checked_is_refused(
    tmp_path: Path, original_seed: int | None, fisher_seed: int, refusal: str,
) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 79.0, 0.0))
    raw = [] if original_seed is None else [dict(ENDS[0], seed=original_seed)]
    raw.append(dict(_row("fisher", 79.0, 0.0), seed=fisher_seed))
    (later / "paper-raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))

    with pytest.raises(SystemExit, match=refusal):
        goal_verdicts.verdicts(f"{base}+{later}")


def test_rows_of_a_run_before_seed_ids_take_their_seeds_from_the_raw_rows(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0, seeds=2))
    raw = [dict(r, seed=seed) for seed in (0, 1, 2) for r in ENDS] + [
        dict(_row("uisps", 79.6, 0.0), seed=seed) for seed in (0, 1)]
    (base / "paper-raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    later = tmp_path / "later-run"
    later.mkdir()
    (later / "paper.json").write_text(json.dumps([_row("unsir", 70.0, 0.0, seeds=2, seed_ids=[0, 2])]))
    (later / "paper-raw.jsonl").write_text("".join(
        json.dumps(dict(r, seed=seed)) + "\n" for seed in (0, 2) for r in (ENDS[0], _row("unsir", 70.0, 0.0))))

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert "unsir: 2" in line.split(" | ")[4]


def test_rows_of_other_originals_are_refused(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, dict(ENDS[0], acc_retain=80.01), _row("fisher", 79.0, 0.0))

    with pytest.raises(SystemExit, match="trained different Originals .* acc_retain differ"):
        goal_verdicts.verdicts(f"{base}+{later}")


def test_rows_of_a_run_before_seed_ids_compare_by_their_count(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0))  # an older run: no seed_ids
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("unsir", 70.0, 0.0, seed_ids=[0, 1, 2]))

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert "| resnet18 | 0 | default | 3 | 0.00: met |" in line


def test_a_folder_below_docs_results_is_named_by_its_path_there(tmp_path: Path) -> None:
    folder = tmp_path / "docs" / "results" / "sweep" / "main"
    folder.mkdir(parents=True)
    (folder / "paper.json").write_text(json.dumps([*ENDS, _row("uisps", 79.6, 0.0)]))

    (line,) = goal_verdicts.verdicts(folder)

    assert line.startswith("| `sweep/main` | resnet18 |")


def test_a_raw_file_whose_last_line_was_cut_short_is_read_without_that_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 79.0, 0.0))
    with (later / "paper-raw.jsonl").open("a") as raw:
        raw.write('{"experiment": "main", "method": "unsi')  # a run stopped mid-write

    (line,) = goal_verdicts.verdicts(f"{base}+{later}")

    assert "| +0.60 over fisher: **not met** |" in line
    assert "cut short" in capsys.readouterr().err


def test_a_raw_file_broken_before_its_last_line_is_refused(tmp_path: Path) -> None:
    base = _folder(tmp_path, *ENDS, _row("uisps", 79.6, 0.0))
    _raw(base, *ENDS)
    later = _later_run(tmp_path, ENDS[0], _row("fisher", 79.0, 0.0))
    (later / "paper-raw.jsonl").write_text("\n{broken\n" + (later / "paper-raw.jsonl").read_text())

    with pytest.raises(SystemExit, match="line 2 of paper-raw.jsonl is not JSON"):  # as an editor numbers it
        goal_verdicts.verdicts(f"{base}+{later}")
