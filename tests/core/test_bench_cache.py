"""core.bench_cache: trained reference models kept on disk by recipe."""

import torch

from core.architectures import build_model
from core.bench_cache import TrainedModels, code_digest, default_root, recipe_key, samples_fingerprint

RECIPE = {"kind": "original", "arch": "smallcnn", "train": {"epochs": 2, "seed": 0}}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn", 1, 10)


def test_a_stored_model_comes_back_with_its_weights_and_seconds(tmp_path):
    models = TrainedModels(tmp_path, log=lambda _: None)
    trained = _model(1).to(memory_format=torch.channels_last)
    models.store(RECIPE, trained, 12.5)

    empty = _model(2)
    assert models.load(RECIPE, empty) == 12.5
    for (name, a), b in zip(trained.state_dict().items(), empty.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert models.hits == 1


def test_another_recipe_is_a_miss(tmp_path):
    models = TrainedModels(tmp_path, log=lambda _: None)
    models.store(RECIPE, _model(1), 1.0)
    assert models.load({**RECIPE, "train": {"epochs": 3, "seed": 0}}, _model(2)) is None


def test_a_file_under_the_wrong_key_is_not_trusted(tmp_path):
    lines: list[str] = []
    models = TrainedModels(tmp_path, log=lines.append)
    other = {**RECIPE, "arch": "other"}
    models.store(other, _model(1), 1.0)
    models.path(other).rename(models.path(RECIPE))  # stored under RECIPE's name, with other's recipe inside

    assert models.load(RECIPE, _model(2)) is None
    assert "recipe differs" in lines[0]


def test_a_store_that_fails_is_reported_not_raised(tmp_path):
    lines: list[str] = []
    (tmp_path / "file").write_text("not a folder")
    TrainedModels(tmp_path / "file", log=lines.append).store(RECIPE, _model(1), 1.0)
    assert "could not store" in lines[0]


def test_the_fingerprint_sees_order_values_and_dtype():
    x = torch.arange(24, dtype=torch.uint8).reshape(4, 1, 2, 3)
    y = torch.tensor([0, 1, 2, 3])
    base = samples_fingerprint(x, y)
    assert samples_fingerprint(x.clone(), y.clone()) == base
    assert samples_fingerprint(x.flip(0), y.flip(0)) != base
    assert samples_fingerprint(x, y.to(torch.int32)) != base
    assert recipe_key({"a": 1, "b": 2}) == recipe_key({"b": 2, "a": 1})


def test_other_training_code_is_another_key() -> None:
    from core import architectures, training

    assert code_digest(training, architectures) == code_digest(training, architectures)
    assert len({code_digest(training), code_digest(architectures), code_digest(training, architectures)}) == 3


def test_the_default_folder_follows_xdg_and_ignores_a_relative_one(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "uisps" / "bench-models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_root().is_absolute() and default_root().parts[-3:] == (".cache", "uisps", "bench-models")


def test_storing_removes_what_a_killed_run_left_half_written(tmp_path) -> None:  # noqa: ANN001
    import os
    import time

    old, recent = tmp_path / "old.part", tmp_path / "recent.part"
    for part in (old, recent):
        part.write_bytes(b"cut short")
    os.utime(old, (time.time() - 2 * 24 * 3600,) * 2)

    TrainedModels(tmp_path, log=lambda _: None).store(RECIPE, _model(1), 1.0)

    assert not old.exists() and recent.exists()  # a run storing right now may own the recent one


def test_the_code_digest_ignores_comments_and_docstrings_but_not_code(tmp_path) -> None:
    import importlib.util

    def module(name: str, source: str):  # noqa: ANN202
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("m", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    plain = module("a", 'def f(x):\n    return x + 1\n')
    annotated = module("b", '"""A module."""\n\ndef f(x):\n    """Adds one."""\n    # why: ...\n    return x + 1  # one\n')
    changed = module("c", 'def f(x):\n    return x + 2\n')
    assert code_digest(plain) == code_digest(annotated) != code_digest(changed)
