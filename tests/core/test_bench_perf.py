"""`bench perf` measures every stage and a Retrain with the same loop in one run."""

import torch

from core.bench_perf import PerfSetup, markdown, run_perf
from core.config import InversionConfig, UnlearnConfig


def test_perf_run_reports_stage_times_and_the_ratio_to_retrain():
    setup = PerfSetup(arch="smallcnn", data="digits", retrain_epochs_timed=1, retrain_epochs_paper=50, precision="fp32")
    cfg = UnlearnConfig(inversion=InversionConfig(iterations=5), steps=3)
    result = run_perf(setup, cfg, torch.device("cpu"))
    assert set(result["stages"]) == {"inversion", "fisher", "relabel", "unlearning", "evaluation"}
    assert all(v > 0 for v in result["stages"].values())
    assert result["retrain_seconds"] == result["retrain_seconds_per_epoch"] * 50
    assert result["ratio"] == result["uisps_seconds"] / result["retrain_seconds"]
    assert result["uisps_seconds"] >= sum(result["stages"].values()) * 0.99
    assert result["bf16"] is False and result["unlearning_steps"] == 3
    assert "ratio UISPS / Retrain" in markdown(result)
