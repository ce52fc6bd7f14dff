"""Markdown table of a `scripts/core_cifar_run.sh` results folder: Original, Retrain, UISPS.

Run: python scripts/summarize_core_cifar.py docs/results/core-cifar > docs/results/core-cifar.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(folder: Path) -> None:
    def load(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None

    print(f"# Core engine on the CIFAR-10 subset, ResNet18 (`{folder}`)\n")
    print("A_Dr, A_Df: percent on the test split; MIA: percent of the forgotten classes' training samples")
    print("called members (entropy attack, core/metrics.py). Times in seconds.\n")
    print("| forget | model | A_Dr | A_Df | MIA | steps | inversion | fisher | unlearning | frozen |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tag, labels in (("0", "0"), ("012", "0,1,2")):
        for name, key in (("Original", f"eval-original-f{tag}.json"), ("Retrain", f"eval-retrain-f{tag}.json")):
            ev = load(key)
            if ev:
                print(f"| {labels} | {name} | {fmt(ev['acc_retain'])} | {fmt(ev['acc_forget'])} | {fmt(ev['mia'])} | | | | | |")
        for mode in ("epoch", "steps350", "plain"):
            rep = load(f"uisps-f{tag}-{mode}.json")
            if rep:
                a, t = rep["after"], rep["timings"]
                print(f"| {labels} | UISPS ({mode}) | {fmt(a['acc_retain'])} | {fmt(a['acc_forget'])} | {fmt(a['mia'])} "
                      f"| {rep['steps']} | {t['inversion']:.1f} | {t['fisher']:.1f} | {t['unlearning']:.1f} "
                      f"| {rep['frozen_fraction']:.3f} |")
    dev = next((load(f"uisps-f{t}-{m}.json") for t in ("0", "012") for m in ("epoch", "steps350", "plain")
                if load(f"uisps-f{t}-{m}.json")), None)
    if dev:
        print(f"\nDevice: {dev['device']}. Made by `scripts/core_cifar_run.sh`; the checkpoints' sha256 are in the JSON reports.")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
