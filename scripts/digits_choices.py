"""Measure the unlearning-pass choices that design.md asks to make explicit, on digits (smallcnn).

For each variant: mean A_Dr / A_Df / MIA over five forget labels (one at a time), from one
original model. Writes docs/results/digits-choices.md. Run: python scripts/digits_choices.py
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

from core.config import InversionConfig, TrainConfig, UnlearnConfig
from core.data import load_dataset
from core.errors import UisError
from core.workflow import evaluate_model, train_model, unlearn_model

LABELS = [1, 3, 5, 7, 9]
BASE = UnlearnConfig(precision="fp32")
VARIANTS: dict[str, UnlearnConfig] = {
    "defaults (16 synthetic per batch, bn train, 20 steps)": BASE,
    "literal mixing (synthetic_per_batch=0)": BASE.model_copy(update={"synthetic_per_batch": 0}),
    "32 synthetic per batch": BASE.model_copy(update={"synthetic_per_batch": 32}),
    "bn_mode=frozen": BASE.model_copy(update={"bn_mode": "frozen"}),
    "no SPS (sps=false)": BASE.model_copy(update={"sps": False}),
    "no entropy term (lambda_entropy=0)": BASE.model_copy(
        update={"inversion": InversionConfig(lambda_entropy=0.0)}),
    "DeepInversion priors (jitter 1, tv 0.01)": BASE.model_copy(
        update={"inversion": InversionConfig(jitter=1, tv_weight=0.01)}),
    "lr 0.01 (one tenth)": BASE.model_copy(update={"lr": 0.01}),
    "one literal epoch (min_steps=1: 10 steps)": BASE.model_copy(update={"min_steps": 1}),
}


def main(out: Path = Path("docs/results/digits-choices.md")) -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    ds = load_dataset("digits")
    model, manifest = train_model(ds, "smallcnn", TrainConfig(epochs=15, lr=0.1, precision="fp32"), device)
    orig = [evaluate_model(model, manifest, ds, [lab], device) for lab in LABELS]
    lines = [
        "# Unlearning-pass choices measured on digits (smallcnn)",
        "",
        f"Mean over forget labels {LABELS} (one at a time) of one original model; test split; "
        "MIA on the forgotten digit's training samples. Made by `python scripts/digits_choices.py`.",
        "",
        "| variant | A_Dr | A_Df | MIA | labels forgotten (A_Df <= 1 %) |",
        "| --- | --- | --- | --- | --- |",
        f"| original | {statistics.mean(e.acc_retain for e in orig):.1f} | "
        f"{statistics.mean(e.acc_forget for e in orig):.1f} | {statistics.mean(e.mia for e in orig):.1f} | - |",
    ]
    for name, cfg in VARIANTS.items():
        rows = []
        for lab in LABELS:
            try:
                rows.append(unlearn_model(copy.deepcopy(model), manifest, ds, [lab], cfg, device).report["after"])
            except UisError as exc:
                rows = []
                lines.append(f"| {name} | failed: {exc} | | | |")
                break
        if rows:
            ok = sum(r["acc_forget"] <= 1.0 for r in rows)
            lines.append(
                f"| {name} | {statistics.mean(r['acc_retain'] for r in rows):.1f} | "
                f"{statistics.mean(r['acc_forget'] for r in rows):.1f} | "
                f"{statistics.mean(r['mia'] for r in rows):.1f} | {ok}/{len(rows)} |"
            )
        print(lines[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
