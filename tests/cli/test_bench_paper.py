"""`uisps bench paper`: the paper's tables, as the lead runs them (quick preset on digits)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import baselines as B
from core.bench_paper import (
    EXPERIMENTS,
    MAIN_METHODS,
    ROW_KEYS,
    PaperBench,
    aggregate,
    make_preset,
    markdown,
    pass_lengths,
    rows_by_device,
)
from core.data import Dataset, RetainedData, Split, validation_split

CPU = torch.device("cpu")


def uisps(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one thread: the tiny digits run takes seconds, where two OpenMP threads on a machine busy
    # with other work can spin-wait it into minutes
    # the model cache goes in the test's folder, never the user's
    env = {k: v for k, v in os.environ.items() if k != "UISPS_CIFAR10_SUBSET"} | {
        "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "uisps", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_quick_preset_writes_every_table_with_every_key(tmp_path):
    run = uisps("bench", "paper", "--preset", "quick", "--out", "results", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "results"
    rows = json.loads((out / "paper.json").read_text())
    assert {r["experiment"] for r in rows} == set(EXPERIMENTS)
    for row in rows:
        assert set(ROW_KEYS) <= row.keys(), row
        assert row["seeds"] == 1 and 0 <= row["acc_retain"] <= 100 and 0 <= row["acc_forget"] <= 100
        assert 0 <= row["mia"] <= 100 and 0 <= row["probe"] <= 100 and row["seconds"] >= 0
        assert row["zero_glance"] == (row["method"] != "amnesiac")
    main = [r for r in rows if r["experiment"] == "main"]
    assert [r["method"] for r in main] == list(MAIN_METHODS)
    by_method = {r["method"]: r for r in main}
    assert by_method["head_mask"]["acc_forget"] == 0.0 and by_method["retrain"]["acc_forget"] == 0.0
    assert by_method["original"]["relearn_steps"] == 0 < by_method["retrain"]["relearn_steps"]
    raw = [json.loads(line) for line in (out / "paper-raw.jsonl").read_text().splitlines()]
    assert len(raw) == len(rows) and all(r["seed"] == 0 for r in raw)
    md = (out / "paper.md").read_text()
    assert "softmax entropy" in md and "preset: **quick**" in md and "device:" in md
    assert md.count("| retrain |") == len(EXPERIMENTS)  # Retrain's MIA stands in every table
    assert "uisps-paper" in md and '"steps"' in md
    assert "![pred-dist-smallcnn-f0.png](pred-dist-smallcnn-f0.png)" in md  # paper Fig. 4/5
    assert (out / "pred-dist-smallcnn-f0.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads(run.stdout)
    assert summary["finished_runs"] == summary["planned_runs"] == len(raw) and not summary["stopped_by_budget"]


def test_time_budget_stops_starting_rows_and_says_so(tmp_path):
    run = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--time-budget", "0",
                "--experiments", "alpha,main", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["stopped_by_budget"] and summary["finished_runs"] == 0
    assert set(summary["not_started"]) == {"main", "alpha"}
    assert "stopped by the time budget" in (tmp_path / "r" / "paper.md").read_text()
    assert json.loads((tmp_path / "r" / "paper.json").read_text()) == []


def test_resume_keeps_finished_rows_and_runs_only_the_rest(tmp_path):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  "--seeds", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    raw_path = tmp_path / "r" / "paper-raw.jsonl"
    earlier = raw_path.read_text().splitlines()
    more = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                 "--seeds", "2", "--resume", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert f"{len(earlier)} finished rows kept, {len(earlier)} to run" in more.stderr
    assert "seed 0:" not in more.stderr  # nothing of the first run was measured again
    raw = raw_path.read_text().splitlines()
    assert raw[: len(earlier)] == earlier
    assert sorted(json.loads(line)["seed"] for line in raw) == [0] * len(earlier) + [1] * len(earlier)
    rows = json.loads((tmp_path / "r" / "paper.json").read_text())
    assert rows and all(r["seeds"] == 2 for r in rows)
    meta = json.loads((tmp_path / "r" / "paper-run.json").read_text())
    assert meta["resumed"]["rows_kept"] == len(earlier) and meta["finished_rows"] == len(raw)


def test_first_seed_runs_the_seeds_from_it_and_a_resume_keeps_the_lower_ones(tmp_path):
    def tune(out: str) -> tuple[str, ...]:
        return ("bench", "paper", "--preset", "quick", "--out", out, "--device", "cpu", "--experiments", "tune")

    alone = uisps(*tune("alone"), "--first-seed", "1", "--seeds", "1", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert {json.loads(line)["seed"] for line in (tmp_path / "alone" / "paper-raw.jsonl").read_text().splitlines()} == {1}
    assert "seeds requested: 1 (from seed 1)" in (tmp_path / "alone" / "paper.md").read_text()

    first = uisps(*tune("r"), "--seeds", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    earlier = (tmp_path / "r" / "paper-raw.jsonl").read_text().splitlines()
    second = uisps(*tune("r"), "--seeds", "1", "--first-seed", "1", "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "seed 0:" not in second.stderr and "seed 1:" in second.stderr
    assert f"{len(earlier)} finished rows kept, {len(earlier)} to run" in second.stderr
    raw = (tmp_path / "r" / "paper-raw.jsonl").read_text().splitlines()
    assert raw[: len(earlier)] == earlier and len(raw) == 2 * len(earlier)
    assert all(r["seeds"] == 2 for r in json.loads((tmp_path / "r" / "paper.json").read_text()))
    meta = json.loads((tmp_path / "r" / "paper-run.json").read_text())
    assert meta["planned_rows"] == meta["finished_rows"] == len(raw)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiments", "tune,alpha"], "other experiments"),
        (["--experiments", "tune", "--preset-json", '{"unlearn": {"alpha": 2.0}}'], "other preset"),
    ],
)
def test_resume_refuses_an_earlier_run_with_other_settings(tmp_path, args, message):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    earlier = (tmp_path / "r" / "paper-raw.jsonl").read_text()
    run = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--resume", *args, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "r" / "paper-raw.jsonl").read_text() == earlier


def test_resume_refuses_rows_that_other_code_computed(tmp_path):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    meta_file = tmp_path / "r" / "paper-run.json"
    meta = json.loads(meta_file.read_text())
    assert len(meta["method_code"]) == 64
    meta_file.write_text(json.dumps(meta | {"method_code": "0" * 64}))  # as if a method changed since
    earlier = (tmp_path / "r" / "paper-raw.jsonl").read_text()
    run = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                "--resume", cwd=tmp_path)
    assert run.returncode == 2 and "the code that computes its rows" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "r" / "paper-raw.jsonl").read_text() == earlier


def test_resume_refuses_rows_that_another_torch_computed(tmp_path):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    meta_file = tmp_path / "r" / "paper-run.json"
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | {"torch": "2.0.0+cpu"}))

    run = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                "--resume", cwd=tmp_path)

    assert run.returncode == 2 and "its earlier run used other torch" in run.stderr


def test_a_table_of_rows_from_several_machines_names_each_with_its_rows():
    raw = [{"device": "cpu (AMD EPYC, x86_64, 2 threads)"}] * 3 + [{"device": "NVIDIA H100 80GB HBM3"}, {}]
    by_device = rows_by_device(raw)

    header = markdown([], {"device": "NVIDIA H100 80GB HBM3", "rows_by_device": by_device}).splitlines()

    assert ("- rows by device: cpu (AMD EPYC, x86_64, 2 threads): 3; NVIDIA H100 80GB HBM3: 1; "
            "not recorded (an earlier run): 1") in header
    assert not any("rows by device" in line for line in markdown([], {"device": "x", "rows_by_device": {"x": 4}}).splitlines())


def test_resume_never_drops_finished_rows(tmp_path):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  "--seeds", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    raw_path = tmp_path / "r" / "paper-raw.jsonl"
    earlier = raw_path.read_text()

    fewer = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  "--seeds", "1", "--resume", cwd=tmp_path)

    assert fewer.returncode == 2 and "resuming would drop them" in fewer.stderr
    assert raw_path.read_text() == earlier


def test_resume_after_a_last_line_cut_short_runs_that_row_again(tmp_path):
    first = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    raw_path = tmp_path / "r" / "paper-raw.jsonl"
    lines = raw_path.read_text().splitlines()
    raw_path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the machine stopped mid-write

    again = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--experiments", "tune",
                  "--resume", cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert f"{len(lines) - 1} finished rows kept, 1 to run" in again.stderr
    assert len(raw_path.read_text().splitlines()) == len(lines)


TUNE = ("bench", "paper", "--preset", "quick", "--device", "cpu", "--experiments", "tune")


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_later_run_reuses_trained_models_and_measures_the_same(tmp_path):
    first = uisps(*TUNE, "--out", "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "from the cache" not in first.stderr
    assert len(list((tmp_path / "cache" / "uisps" / "bench-models").glob("*.safetensors"))) == 2

    second = uisps(*TUNE, "--out", "b", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    assert second.stderr.count("trained model from the cache") == 2  # the Original and the Retrain
    timings = {"seconds", "inversion_seconds"}
    measured = [[{k: v for k, v in r.items() if k not in timings} for r in _raw(tmp_path / out / "paper-raw.jsonl")]
                for out in ("a", "b")]
    assert measured[0] == measured[1]  # every row, the Original's and Retrain's included
    meta = json.loads((tmp_path / "b" / "paper-run.json").read_text())
    assert meta["models_from_cache"] == 2 and "read from the model cache: 2" in (tmp_path / "b" / "paper.md").read_text()


def test_another_recipe_or_an_unusable_file_trains_again(tmp_path):
    assert uisps(*TUNE, "--out", "a", cwd=tmp_path).returncode == 0
    stored = sorted((tmp_path / "cache" / "uisps" / "bench-models").glob("*.safetensors"))
    other = uisps(*TUNE, "--out", "b", "--preset-json", '{"train": {"epochs": 5, "lr": 0.1}}', cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert "from the cache" not in other.stderr

    stored[0].write_bytes(stored[0].read_bytes()[:100])  # cut short
    again = uisps(*TUNE, "--out", "c", cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert again.stderr.count("is unusable") == 1 and again.stderr.count("from the cache") == 1
    assert len(_raw(tmp_path / "c" / "paper-raw.jsonl")) == len(_raw(tmp_path / "a" / "paper-raw.jsonl"))
    assert stored[0].stat().st_size > 1000  # trained again and stored again


def test_no_model_cache_stores_nothing(tmp_path):
    run = uisps(*TUNE, "--out", "a", "--no-model-cache", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "cache" / "uisps").exists()


def test_resume_without_an_earlier_run_is_one_clear_line(tmp_path):
    run = uisps("bench", "paper", "--preset", "quick", "--out", "r", "--device", "cpu", "--resume", cwd=tmp_path)
    assert run.returncode == 2 and "nothing to resume" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "unknown preset"),
        (["--preset", "full"], "--data"),
        (["--preset-json", '{"epochs": 3}'], "unknown setting"),
        (["--model-cache", "c", "--no-model-cache"], "exclude each other"),
        (["--first-seed", "-1"], "--first-seed"),
    ],
)
def test_bad_options_are_one_clear_line(tmp_path, args, message):
    run = uisps("bench", "paper", "--out", "r", *args, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()


def test_bad_settings_fail_before_anything_runs(trained_digits, tmp_path):
    ds = trained_digits.dataset
    with pytest.raises(ValueError, match="unknown experiments"):
        PaperBench(make_preset("quick"), ds, CPU, tmp_path, experiments=["main", "tables"])
    with pytest.raises(ValueError, match="order"):
        PaperBench(make_preset("quick"), ds, CPU, tmp_path, order="random")
    with pytest.raises(ValueError, match="lr"):
        PaperBench(make_preset("quick", {"train": {"lr": -1}}), ds, CPU, tmp_path)
    with pytest.raises(ValueError, match="unknown setting"):
        make_preset("full", {"unsir": {"noise": 1}})


def test_preset_overrides_reach_nested_settings():
    p = make_preset("full", {"train": {"epochs": 2}, "archs": ["allcnn"], "unsir": {"noise_steps": 3},
                             "main_forget": [[1], [1, 2]], "unlearn": {"inversion": {"iterations": 7}}})
    assert p.train == {"epochs": 2, "lr": 0.1} and p.archs == ("allcnn",) and p.main_forget == ((1,), (1, 2))
    assert p.unsir.noise_steps == 3 and p.unsir.noise_lr == 0.1
    assert p.unlearn == {"fisher_chunk": 64, "inversion": {"iterations": 7}}


def test_full_plan_covers_the_papers_tables(trained_digits, tmp_path):
    bench = PaperBench(make_preset("full"), trained_digits.dataset, CPU, tmp_path, seeds=1)
    units = bench.plan()
    count = {e: sum(u.experiment == e for u in units) for e in EXPERIMENTS}
    assert count == {"main": 2 * 2 * 11, "tune": 2 * 2 * (2 + 5), "ablation": 4 * (2 + 4), "alpha": 2 + 6, "lambda": 2 + 9,
                     "retain_fraction": 4 * 5}
    paper = [u for u in units if u.experiment == "tune" and u.setting == "paper"]
    assert paper and all(u.unlearn.synthetic_per_batch == 0 and u.unlearn.lr is None and u.unlearn.steps is None
                         and u.unlearn.lr_schedule == "constant" and u.unlearn.preset == "paper" for u in paper)
    literal = [u for u in units if u.method == "uisps-paper"]
    assert literal and all(u.unlearn.preset == "paper" and u.unlearn.min_steps == 1 for u in literal)
    default = [u for u in units if u.experiment == "main" and u.method == "uisps"]
    assert default and all(u.unlearn.min_steps == 350 and u.unlearn.lr_schedule == "cosine" for u in default)
    no_entropy = [u for u in units if u.setting.startswith("entropy=off")]
    assert all(u.unlearn.inversion.lambda_entropy == 0 for u in no_entropy)
    seed_major = PaperBench(make_preset("full"), trained_digits.dataset, CPU, tmp_path, seeds=2, order="seed").plan()
    assert [u.seed for u in seed_major][: len(units)] == [0] * len(units)


def test_the_run_s_pass_overrides_reach_the_default_rows_and_never_the_paper_preset_s(trained_digits, tmp_path):
    preset = make_preset("full", {"unlearn": {"steps": 500, "lr": 0.05, "inversion": {"iterations": 7}}})
    units = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, seeds=1).plan()

    default = [u for u in units if u.method == "uisps" and u.experiment in ("main", "alpha")]
    assert default and all((u.unlearn.steps, u.unlearn.lr) == (500, 0.05) for u in default)
    paper = [u for u in units if u.unlearn is not None and u.unlearn.preset == "paper"]
    assert paper and all((u.unlearn.steps, u.unlearn.lr, u.unlearn.min_steps) == (None, None, 1) for u in paper)
    assert all(u.unlearn.inversion.iterations == 7 for u in default + paper)  # not part of the pass


def test_baseline_rows_run_with_other_settings_say_which(trained_digits, tmp_path):
    # an equal-budget fine-tune must not read as the default one in the tables
    preset = make_preset("full", {"finetune": {"min_steps": 350}, "unsir": {"min_steps": 350, "impair_lr": 0.05}})
    units = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, seeds=1).plan()
    setting = {u.method: u.setting for u in units if u.experiment == "main"}
    assert setting["finetune"] == "min_steps=350"
    assert setting["unsir"] == "impair_lr=0.05, min_steps=350"
    assert setting["amnesiac"] == setting["fisher"] == setting["bad_teacher_sps"] == setting["head_mask"] == "default"


def test_pass_lengths_list_every_method_that_trains():
    raw = [{"experiment": "main", "arch": "a", "method": m, "steps": n}
           for m, n in (("uisps", 350), ("finetune", 175), ("finetune", 180), ("fisher", None))]
    assert pass_lengths(raw) == {"main/a/uisps": [350], "main/a/finetune": [175, 180]}


def test_the_benchmark_hands_zero_glance_methods_only_retained_data(trained_digits, tmp_path, monkeypatch):
    """Every method call of a `main` table, recorded: no forgotten sample reaches a zero-glance one."""
    preset = make_preset("quick", {"relearn_experiments": []})
    bench = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, seeds=1)
    bench._originals[("smallcnn", 0)] = (trained_digits.model, 0.0)  # skip training
    calls = []

    def spy(name):
        def fn(model, arch, retained, forget_labels, mean, std, device, seed, **kwargs):
            calls.append((name, retained, list(forget_labels), kwargs))
            return model
        return fn

    for name, spec in B.METHODS.items():
        monkeypatch.setitem(B.METHODS, name, B.MethodSpec(**{**spec.__dict__, "fn": spy(name)}))
    for unit in bench.units("main", 0):
        if unit.kind not in ("original", "retrain"):
            bench.run_unit(unit)
    assert {name for name, *_ in calls} == set(B.METHODS) - {"retrain"}
    assert len({tuple(labels) for _, _, labels, _ in calls}) == len(preset.main_forget)  # every forget set
    for name, retained, forget_labels, kwargs in calls:
        forget = torch.tensor(forget_labels)
        assert isinstance(retained, RetainedData) and not torch.isin(retained.train.y, forget).any()
        data = [v for v in kwargs.values() if isinstance(v, (Split, Dataset, torch.Tensor))]
        if B.METHODS[name].zero_glance:
            assert data == [], name  # no samples at all besides the retained data
        else:
            assert len(data) == 1 and isinstance(data[0], Split) and torch.isin(data[0].y, forget).all()


def test_a_retrain_on_part_of_d_r_is_attacked_with_that_part_as_its_members(trained_digits, tmp_path, monkeypatch):
    import core.bench_paper

    preset = make_preset("quick", {"relearn_experiments": [], "train": {"epochs": 1}})
    bench = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, experiments=["retain_fraction"], log=lambda line: None)
    members_seen = []
    evaluate = core.bench_paper.evaluate

    def recording(*args, members=None, **kwargs):
        members_seen.append(members)
        return evaluate(*args, members=members, **kwargs)

    monkeypatch.setattr(core.bench_paper, "evaluate", recording)
    (unit,) = [u for u in bench.units("retain_fraction", 0) if u.kind == "retrain" and u.retain_fraction < 1]
    bench.run_unit(unit)
    trained_on = bench.retained(unit.forget, unit.retain_fraction, 0).train
    (members,) = members_seen
    assert members is not None and torch.equal(members.x, trained_on.x)
    assert len(members) < len(trained_digits.dataset.train.without_labels(unit.forget))


def test_a_validation_run_trains_and_scores_without_the_test_split(trained_digits, tmp_path):
    digits = trained_digits.dataset
    # a test split of the wrong shape: any model that read it would fail
    unreadable = Split(torch.zeros((4, 2, 5, 5), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    dataset = Dataset(digits.spec, digits.train, unreadable, digits.classes, digits.flip)
    preset = make_preset("quick", {"validation": 0.25, "relearn_experiments": []})
    bench = PaperBench(preset, dataset, CPU, tmp_path, experiments=["tune"], log=lambda line: None)

    (original,) = [u for u in bench.units("tune", 0) if u.kind == "original"]
    row = bench.run_unit(original)

    held = validation_split(digits, 0.25)
    assert torch.equal(bench.dataset.test.x, held.test.x) and torch.equal(bench.dataset.train.x, held.train.x)
    assert 50 < row["acc_retain"] <= 100  # an Original trained on the rest, scored on the held-out images
    meta = bench._meta(planned=1)
    assert meta["scored_on"] == "validation" and meta["test_samples"] == len(held.test)
    assert "scored on a validation split" in markdown([], meta)
    assert "validation split" not in markdown([], {**meta, "scored_on": "test"})


def test_the_tables_show_the_balanced_probe_beside_the_plain_one():
    # With one forgotten class of ten, the plain accuracy of a probe fitted with balanced weights
    # mostly counts false alarms on retained samples; the balanced one says how well it finds the class.
    base = {"experiment": "main", "arch": "a", "forget": [0], "setting": "s", "seed": 0, "acc_retain": 80.0,
            "acc_forget": 0.0, "mia": 10.0, "relearn_steps": 10, "relearn_reached": True, "seconds": 1.0}
    rows = aggregate([{**base, "method": "original", "zero_glance": True, "probe": 91.94, "probe_balanced": 84.67},
                      {**base, "method": "uisps", "zero_glance": True, "probe": 89.98, "probe_balanced": 86.07}])

    table = [line for line in markdown(rows, {}).splitlines() if line.startswith("| ") and "---" not in line]

    assert table[0].split(" | ")[7:9] == ["probe", "probe (bal.)"]
    assert table[1].split(" | ")[7:9] == ["91.94", "84.67"] and table[2].split(" | ")[7:9] == ["89.98", "86.07"]
    assert table[1].split(" | ")[-2] == "n/a" and table[2].split(" | ")[-2] == "yes"  # the Original is no method


def test_the_sweep_tables_show_how_much_sps_froze_and_what_they_vary():
    # alpha acts only through the share SPS freezes: a Table X without it cannot be read
    base = {"experiment": "alpha", "arch": "a", "forget": [0], "seed": 0, "acc_retain": 80.0, "acc_forget": 0.0,
            "mia": 10.0, "probe": 90.0, "probe_balanced": 80.0, "relearn_steps": 10, "relearn_reached": True,
            "seconds": 1.0, "zero_glance": True}
    rows = aggregate([{**base, "method": "retrain", "setting": "trained on D_r"},
                      {**base, "method": "uisps", "setting": "alpha=0.5", "frozen_fraction": 0.25},
                      {**base, "method": "uisps", "setting": "alpha=0.5", "frozen_fraction": 0.20, "seed": 1},
                      {**base, "experiment": "lambda", "method": "uisps", "setting": "lambda1=0.01, lambda2=0.05"}])
    md = markdown(rows, {"preset": {"lambda_bn": [0.01], "lambda_entropy": [0.05, 0.5]}})
    table = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0][11] == "frozen %" and table[1][11] == "-"  # Retrain froze nothing
    assert table[2][11] == "22.5" and table[2][-1] == "2 |"
    assert "a 1 x 2 grid, a subset of the paper's 5 x 5 that holds its default" in md
    assert "a lower alpha freezes more" in md
    other = markdown(rows, {"preset": {"lambda_bn": [0.01], "lambda_entropy": [0.5]}})
    assert "that leaves out its default (0.01, 0.05)" in other


def test_the_tables_say_which_pass_the_sweeps_ran_on():
    row = {"experiment": "retain_fraction", "arch": "a", "forget": [0], "method": "uisps", "setting": "retain=20%",
           "seed": 0, "acc_retain": 80.0, "acc_forget": 0.0, "mia": 10.0, "probe": 90.0, "relearn_steps": 10,
           "relearn_reached": True, "seconds": 1.0, "zero_glance": True}
    default = markdown(aggregate([row]), {"preset": {"unlearn": {"fisher_chunk": 64}}})
    paper = markdown(aggregate([row]), {"preset": {"unlearn": {"fisher_chunk": 64, "preset": "paper"}}})
    fixed = markdown(aggregate([row]), {"preset": {"unlearn": {}, "sweep_steps": 100}})
    assert "runs the default pass" in default and "floored at 350 steps at every fraction" in default
    assert "runs the paper's pass" in paper and "one epoch of the fraction" in paper
    assert "runs the default pass" not in paper and "this run's base pass is the paper's" in paper
    assert "for 100 steps with only" in fixed and "UISPS's pass is 100 steps at every fraction" in fixed


def test_rows_of_a_run_on_the_paper_s_pass_or_other_baseline_settings_say_so(trained_digits, tmp_path):
    preset = make_preset("full", {"unlearn": {"preset": "paper"}, "finetune": {"min_steps": 350}})
    units = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, seeds=1).plan()
    main = {u.method: u.setting for u in units if u.experiment == "main"}
    assert main["uisps"] == main["uisps-paper"] == "preset=paper"
    fractions = {u.setting for u in units if u.experiment == "retain_fraction" and u.method == "finetune"}
    assert "retain=20%, min_steps=350" in fractions


def test_a_negative_inversion_weight_in_a_sweep_is_refused(trained_digits, tmp_path):
    # it would turn the entropy term around without a word
    preset = make_preset("full", {"lambda_entropy": [-1.0]})
    with pytest.raises(ValueError, match="lambda_entropy"):
        PaperBench(preset, trained_digits.dataset, CPU, tmp_path, experiments=["lambda"], seeds=1).plan()


def test_aggregate_means_over_seeds():
    base = {"experiment": "main", "arch": "a", "forget": [0], "method": "m", "setting": "s", "zero_glance": True,
            "probe": 50.0, "probe_balanced": 50.0, "relearn_steps": 10, "relearn_reached": True, "seconds": 1.0,
            "forget_histogram": [1, 2]}
    rows = aggregate([{**base, "seed": 0, "acc_retain": 90.0, "acc_forget": 0.0, "mia": 10.0},
                      {**base, "seed": 1, "acc_retain": 80.0, "acc_forget": 2.0, "mia": 30.0, "relearn_reached": False,
                       "probe": 60.0, "relearn_steps": 14, "seconds": 3.0}])
    (row,) = rows
    assert row["seeds"] == 2 and row["seed_ids"] == [0, 1] and row["acc_retain"] == 85.0 and row["mia"] == 20.0
    assert row["acc_retain_std"] == pytest.approx(7.0711, abs=1e-3)
    assert (row["probe"], row["relearn_steps"], row["seconds"]) == (55.0, 12.0, 2.0)
    assert row["probe_std"] == pytest.approx(7.0711, abs=1e-3) and row["seconds_std"] == pytest.approx(1.4142, abs=1e-3)
    assert row["relearn_steps_std"] == pytest.approx(2.8284, abs=1e-3)
    assert row["forget_histogram"] == [2, 4] and row["relearn_capped"] == 1


def test_one_seed_has_no_spread_rather_than_a_spread_of_zero():
    row = {"experiment": "main", "arch": "a", "forget": [0], "method": "m", "setting": "s", "zero_glance": True,
           "seed": 2, "acc_retain": 90.0, "acc_forget": 0.0, "mia": 10.0, "probe": 50.0, "relearn_steps": 10,
           "relearn_reached": True, "seconds": 1.0}
    (one,) = aggregate([row])
    assert one["seed_ids"] == [2] and one["acc_retain_std"] is None and one["mia_std"] is None


def test_a_failing_row_is_reported_and_the_run_goes_on(trained_digits, tmp_path, monkeypatch):
    preset = make_preset("quick", {"main_methods": ["original", "fisher", "head_mask"]})
    bench = PaperBench(preset, trained_digits.dataset, CPU, tmp_path, experiments=["main"], log=lambda line: None)
    bench._originals[("smallcnn", 0)] = (trained_digits.model, 0.0)

    def broken(*args, **kwargs):
        raise RuntimeError("diverged")

    monkeypatch.setitem(B.METHODS, "fisher", B.MethodSpec(**{**B.METHODS["fisher"].__dict__, "fn": broken}))
    rows = bench.run()
    assert [r["method"] for r in rows] == ["original", "head_mask"]
    assert bench.meta["failures"] == [{"unit": "main/smallcnn/forget=[0]/fisher/samples=64/seed=0",
                                       "error": "RuntimeError: diverged"}]
    assert "**failed**" in (tmp_path / "paper.md").read_text()
