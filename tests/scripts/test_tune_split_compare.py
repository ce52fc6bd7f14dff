"""scripts/tune_split_compare.py: which pass each split would choose, from two `tune` runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "tune_split_compare", Path(__file__).parents[2] / "scripts" / "tune_split_compare.py")
tune_split_compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tune_split_compare)


def _row(setting: str, a_dr: float, a_df: float, experiment: str = "tune", method: str = "uisps") -> dict:
    return {"experiment": experiment, "arch": "smallcnn", "method": method, "setting": setting, "forget": [0],
            "seeds": 3, "acc_retain": a_dr, "acc_retain_std": 0.5, "acc_forget": a_df}


def _run(folder: Path, rows: dict[str, tuple[float, float]], *others: dict) -> Path:
    folder.mkdir()
    tune = [_row(setting, a_dr, a_df) for setting, (a_dr, a_df) in rows.items()]
    original = _row("trained on D", 90.0, 90.0, method="original")
    (folder / "paper.json").write_text(json.dumps([original, *tune, *others]))
    return folder


def test_the_best_retained_accuracy_among_variants_that_forget_is_chosen(tmp_path: Path) -> None:
    # a main table's default row in the same run is another table: never mixed in
    validation = _run(tmp_path / "v", {"default": (80.0, 0.0), "keeps the class": (85.0, 12.0), "slow": (78.0, 0.5)},
                      _row("default", 99.0, 0.0, experiment="main"))
    test = _run(tmp_path / "t", {"default": (79.0, 0.0), "keeps the class": (84.0, 11.0), "slow": (79.5, 1.0)})

    table = tune_split_compare.compare(validation, test)

    assert "| keeps the class | 85.00 ± 0.50 | 12.00 | does not forget | 84.00 ± 0.50 | 11.00 | does not forget |" in table
    assert "| default | 80.00 ± 0.50 | 0.00 | 1 | 79.00 ± 0.50 | 0.00 | 2 |" in table
    assert "smallcnn, forget [0] (seeds: 3):" in table
    assert "Chosen on the validation split: default; on the test split: slow (not the same)." in table


def test_variants_of_one_run_only_are_named_and_not_ranked(tmp_path: Path) -> None:
    validation = _run(tmp_path / "v", {"default": (80.0, 0.0), "new": (90.0, 0.0)})
    test = _run(tmp_path / "t", {"default": (79.0, 0.0)})

    table = tune_split_compare.compare(validation, test)

    assert "Chosen on the validation split: default; on the test split: default (the same)." in table
    assert "In one run only, not ranked: new." in table


def test_when_no_variant_forgets_it_says_so(tmp_path: Path) -> None:
    validation = _run(tmp_path / "v", {"default": (80.0, 5.0)})
    test = _run(tmp_path / "t", {"default": (79.0, 6.0)})

    assert "No variant forgets on either split." in tune_split_compare.compare(validation, test)
