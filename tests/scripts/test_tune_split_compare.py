"""scripts/tune_split_compare.py: which pass each split would choose, from two `tune` runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "tune_split_compare", Path(__file__).parents[2] / "scripts" / "tune_split_compare.py")
tune_split_compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tune_split_compare)


def _run(folder: Path, rows: dict[str, tuple[float, float]]) -> Path:
    folder.mkdir()
    original = {"method": "original", "setting": "trained on D", "forget": [0], "acc_retain": 90.0, "acc_forget": 90.0}
    uisps = [{"method": "uisps", "setting": setting, "forget": [0], "seeds": 3, "acc_retain": a_dr,
              "acc_retain_std": 0.5, "acc_forget": a_df} for setting, (a_dr, a_df) in rows.items()]
    (folder / "paper.json").write_text(json.dumps([original, *uisps]))
    return folder


def test_the_best_retained_accuracy_among_variants_that_forget_is_chosen(tmp_path: Path) -> None:
    validation = _run(tmp_path / "v", {"default": (80.0, 0.0), "keeps the class": (85.0, 12.0), "slow": (78.0, 0.5)})
    test = _run(tmp_path / "t", {"default": (79.0, 0.0), "keeps the class": (84.0, 11.0), "slow": (79.5, 1.0)})

    table = tune_split_compare.compare(validation, test)

    assert "| keeps the class | 85.00 ± 0.50 | 12.00 | does not forget | 84.00 ± 0.50 | 11.00 | does not forget |" in table
    assert "| default | 80.00 ± 0.50 | 0.00 | 1 | 79.00 ± 0.50 | 0.00 | 2 |" in table
    assert "Chosen on the validation split: default; on the test split: slow (not the same)." in table
