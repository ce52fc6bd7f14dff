"""`uisps bench paper`: the paper's comparison tables, re-run on one data set in one go.

Experiments, in priority order (the run stops *starting* units once its time budget is spent,
and says so; every finished row is already on disk):

- `main` (Tables I, IV): forget 1 class ([0]) and 3 classes ([0, 1, 2]), ResNet18 and AllCNN,
  every method: Original, Retrain, Fine-tune, Amnesiac (not zero-glance), UNSIR, Fisher, bad
  teacher with and without SPS, the head-mask control, UISPS (the default pass) and UISPS-paper
  (`preset=paper`: the paper's pass read literally).
- `tune`: UISPS pass settings side by side (TUNE_VARIANTS), every arch and forget set of `main`:
  the evidence the default pass was chosen from.
- `ablation` (Table II): UISPS with/without the entropy term (lambda2 = 0) and with/without SPS,
  forgetting 1/3/5/7 classes, ResNet18.
- `alpha` (Table X): alpha 0.5 .. 3.0.  `lambda` (Table XII): a 3 x 3 grid of lambda1 x lambda2.
- `retain_fraction` (Tables VI, VII): 20/40/60/80 % of D_r (stratified, seeded), for Retrain
  (trained on that fraction), Fine-tune, UNSIR and UISPS.

Every row is evaluated the same way: A_Dr and A_Df on the test split (percent; with `validation`,
on a split held out of the training set instead), MIA on the forgotten classes' training samples
(core.metrics), the feature probe and the relearn time (core.forgetting_probes), and the
method's wall time. Trained Original and Retrain models and the inversions (D_g) are cached per
(architecture, seed, forget set[, settings]) within a run, so nothing is trained or inverted
twice; a row of a method that uses D_g counts the inversion's time in its `seconds`.

Output (in `out`): `paper-raw.jsonl` (one line per finished (row, seed), appended as it
finishes), `paper.json` (rows aggregated over seeds, rewritten after every row), `paper.md`
(tables per experiment, device, preset, MIA definition, the UISPS settings), `paper-run.json`
(run metadata) and `pred-dist-*.png` (prediction distributions on the forgotten test samples,
paper Fig. 4/5; needs matplotlib).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import baselines as B
from core.architectures import build_model, unlearning_lr
from core.bench_cache import TrainedModels, code_digest, cpu_name, samples_fingerprint
from core.config import PAPER_PASS, InversionConfig, TrainConfig, UnlearnConfig
from core.data import Dataset, RetainedData, Split, retained_data, stratified_sample, validation_split
from core.device import use_bf16
from core.forgetting_probes import (
    ProbeConfig,
    RelearnConfig,
    feature_probe,
    relearn_steps,
)
from core.inversion import Synthetic, invert
from core.metrics import MIA_DEFINITION, evaluate
from core.workflow import train_model

EXPERIMENTS = ("main", "tune", "ablation", "alpha", "lambda", "retain_fraction")
# `tune`: UISPS pass settings side by side on every arch and forget set of `main`, the evidence
# the default is chosen from. The paper's literal pass first; then faster passes whose rate decays
# (cosine) and whose soft labels leave out the forgotten classes, each change also shown alone.
TUNE_VARIANTS: tuple[tuple[str, dict], ...] = (
    ("paper", {"preset": "paper"}),
    ("lr 0.01, cosine, one epoch, excl", {**PAPER_PASS, "lr": 0.01, "min_steps": 20, "synthetic_per_batch": 16,
                                          "lr_schedule": "cosine", "relabel_exclude_forgotten": True}),
    ("lr 0.01, cosine, 350 steps, excl", {**PAPER_PASS, "lr": 0.01, "steps": 350, "synthetic_per_batch": 16,
                                          "lr_schedule": "cosine", "relabel_exclude_forgotten": True}),
    ("lr 0.03, cosine, 350 steps, excl", {**PAPER_PASS, "lr": 0.03, "steps": 350, "synthetic_per_batch": 16,
                                          "lr_schedule": "cosine", "relabel_exclude_forgotten": True}),
    ("lr 0.03, cosine, 350 steps", {**PAPER_PASS, "lr": 0.03, "steps": 350, "synthetic_per_batch": 16,
                                    "lr_schedule": "cosine"}),
)
MAIN_METHODS = (
    "original", "retrain", "finetune", "amnesiac", "unsir", "fisher",
    "bad_teacher", "bad_teacher_sps", "head_mask", "uisps", "uisps-paper",
)
ROW_KEYS = (
    "experiment", "arch", "forget", "method", "setting", "seeds", "seed_ids", "acc_retain", "acc_retain_std",
    "acc_forget", "acc_forget_std", "mia", "mia_std", "probe", "probe_std", "relearn_steps", "relearn_steps_std",
    "seconds", "seconds_std", "zero_glance",
)


@dataclass
class Preset:
    """Every number of a benchmark run. `full` is the paper's settings on the CIFAR-10 subset,
    `quick` a digits-sized smoke run; `--preset-json` overrides any field (nested ones too)."""

    name: str = "full"
    data: str | None = None  # default data spec (full: from --data or $UISPS_CIFAR10_SUBSET)
    archs: tuple[str, ...] = ("resnet18", "allcnn")
    sweep_arch: str = "resnet18"  # the architecture of ablation / alpha / lambda / retain_fraction
    seeds: int = 3
    # Original and Retrain: core.training's SGD one-cycle. The subset has 5,085 training images,
    # 40 steps of 128 per epoch: 30 epochs = 1,200 steps (about 10-15 s for ResNet18 on an H100).
    train: dict = field(default_factory=lambda: {"epochs": 30, "lr": 0.1})
    # UnlearnConfig overrides for every UISPS row (paper defaults otherwise: 1000 inversion
    # iterations, 32 per class, alpha 1.5, ...). A larger vmap chunk only speeds the Fisher up.
    unlearn: dict = field(default_factory=lambda: {"fisher_chunk": 64})
    main_methods: tuple[str, ...] = MAIN_METHODS
    main_forget: tuple[tuple[int, ...], ...] = ((0,), (0, 1, 2))
    ablation_forget: tuple[tuple[int, ...], ...] = ((0,), (0, 1, 2), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5, 6))
    sweep_forget: tuple[int, ...] = (0,)  # alpha and lambda
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    lambda_bn: tuple[float, ...] = (0.005, 0.01, 0.1)  # lambda1
    lambda_entropy: tuple[float, ...] = (0.01, 0.05, 0.5)  # lambda2
    retain_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    retain_forget: tuple[int, ...] = (0, 1, 2)
    retain_methods: tuple[str, ...] = ("original", "retrain", "finetune", "unsir", "uisps")
    # UISPS pass length outside `main` and `tune` (None: the default pass's)
    sweep_steps: int | None = None
    finetune: B.FinetuneConfig = field(default_factory=B.FinetuneConfig)
    amnesiac: B.AmnesiacConfig = field(default_factory=B.AmnesiacConfig)
    unsir: B.UNSIRConfig = field(default_factory=B.UNSIRConfig)
    fisher: B.FisherForgettingConfig = field(default_factory=lambda: B.FisherForgettingConfig(chunk=64))
    bad_teacher: B.BadTeacherConfig = field(default_factory=lambda: B.BadTeacherConfig(fisher_chunk=64))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    relearn: RelearnConfig = field(default_factory=RelearnConfig)
    tune_variants: tuple[tuple[str, dict], ...] = TUNE_VARIANTS
    tune_archs: tuple[str, ...] | None = None  # default: `archs`
    relearn_experiments: tuple[str, ...] = EXPERIMENTS  # where the relearn probe runs
    # > 0: this fraction of each class's training images (seeded, the same for every seed of the
    # run) is held out and scored in place of the test split; everything trains on the rest. For
    # choosing settings (`tune`) without reading the test split the tables are scored on.
    validation: float = 0.0
    precision: str = "auto"  # bf16 autocast on CUDA
    cudnn_benchmark: bool = True


PRESETS: dict[str, Callable[[], Preset]] = {
    "full": Preset,
    "quick": lambda: Preset(
        name="quick",
        data="digits",
        archs=("smallcnn",),
        sweep_arch="smallcnn",
        seeds=1,
        train={"epochs": 6, "lr": 0.1},
        unlearn={"inversion": {"iterations": 40, "n_per_class": 16}},
        tune_variants=(TUNE_VARIANTS[0], ("lr 0.1, cosine, 40 steps, excl", {
            **PAPER_PASS, "lr": 0.1, "steps": 40, "synthetic_per_batch": 16, "lr_schedule": "cosine",
            "relabel_exclude_forgotten": True})),
        main_forget=((0,),),
        ablation_forget=((0,),),
        alphas=(2.0,),
        lambda_bn=(0.01,),
        lambda_entropy=(0.5,),
        retain_fractions=(0.5,),
        retain_forget=(0,),
        finetune=B.FinetuneConfig(epochs=1),
        unsir=B.UNSIRConfig(noise_steps=5),
        fisher=B.FisherForgettingConfig(samples=64),
        relearn=RelearnConfig(max_steps=30),
    ),
}


def _override(obj: object, changes: dict) -> object:
    """A copy of dataclass `obj` with `changes` applied, recursing into nested dataclasses/dicts."""
    if not isinstance(changes, dict):
        raise ValueError(f"expected an object of overrides, got {changes!r}")
    known = {f.name: f for f in fields(obj)}  # type: ignore[arg-type]
    updates = {}
    for key, value in changes.items():
        if key not in known:
            raise ValueError(f"unknown setting {key!r} of {type(obj).__name__} (known: {', '.join(known)})")
        current = getattr(obj, key)
        if is_dataclass(current) and isinstance(value, dict):
            value = _override(current, value)
        elif isinstance(current, dict) and isinstance(value, dict):
            value = _merge(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        updates[key] = value
    return replace(obj, **updates)  # type: ignore[type-var]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_preset(name: str, overrides: dict | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]()
    return _override(preset, overrides) if overrides else preset  # type: ignore[return-value]


# fields that change the speed or the arithmetic's precision, not the method
_NOT_A_SETTING = {"precision", "chunk", "fisher_chunk"}


def _setting_value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)


@dataclass(frozen=True)
class Unit:
    """One (experiment, arch, forget set, method, setting) at one seed: one raw row."""

    experiment: str
    arch: str
    forget: tuple[int, ...]
    method: str  # the row's name (`uisps-paper` runs the `uisps` method)
    setting: str
    seed: int
    kind: str  # "original", or a key of core.baselines.METHODS
    retain_fraction: float = 1.0
    unlearn: UnlearnConfig | None = None  # for UISPS rows

    @property
    def zero_glance(self) -> bool:
        return True if self.kind == "original" else B.METHODS[self.kind].zero_glance


def _unit_name(u: Unit) -> str:
    return f"{u.experiment}/{u.arch}/forget={list(u.forget)}/{u.method}/{u.setting}/seed={u.seed}"


# what a resumed run must share with the run whose rows it keeps (seeds and budget may differ)
_RESUME_MUST_MATCH = ("preset", "data", "experiments", "unlearn_config", "bf16", "method_code", "torch")


def _unit_key(u: Unit) -> tuple:
    return _row_key(vars(u))


def _row_key(row: dict) -> tuple:
    return (row["experiment"], row["arch"], tuple(row["forget"]), row["method"], row["setting"], row["seed"],
            row["retain_fraction"])


def _jsonable_roundtrip(value: object) -> object:
    """As the value reads back from paper-run.json (tuples become lists)."""
    return json.loads(json.dumps(value))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # the CPU's model: an AMX, an AVX-512 and an AVX2 machine give other figures and other seconds
    return f"cpu ({cpu_name()}, {platform.machine()}, {torch.get_num_threads()} threads)"


@functools.cache
def _training_code() -> str:
    """The digest of the code that trains Originals and Retrains (their cache key's part)."""
    from core import architectures, device, training, workflow

    return code_digest(architectures, B, device, training, workflow)


@functools.cache
def _method_code() -> str:
    """The digest of the code that computes a row (the methods, their data and the measures): a
    row of other code is another measurement, which a resume must not average with these."""
    names = ("architectures", "baselines", "bench_paper", "config", "data", "device", "fisher", "forgetting_probes",
             "inversion", "metrics", "training", "uisps", "workflow")
    return code_digest(*(importlib.import_module(f"core.{name}") for name in names))


def _timed(train_fn: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module, float]:
    """The model `train_fn` trains, in eval mode, and the seconds it took."""
    _sync(device)
    start = time.perf_counter()
    model = train_fn()
    _sync(device)
    return model.eval(), time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj: object) -> object:
    if is_dataclass(obj):
        return _jsonable(asdict(obj))  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "model_dump"):
        return obj.model_dump()  # type: ignore[union-attr]
    return obj


class PaperBench:
    def __init__(
        self,
        preset: Preset,
        dataset: Dataset,
        device: torch.device,
        out: Path,
        experiments: Iterable[str] = EXPERIMENTS,
        seeds: int | None = None,
        time_budget: float | None = None,
        order: str = "seed",
        log: Callable[[str], None] = print,
        resume: bool = False,
        models: TrainedModels | None = None,
        first_seed: int = 0,
    ) -> None:
        unknown = set(experiments) - set(EXPERIMENTS)
        if unknown:
            raise ValueError(f"unknown experiments {sorted(unknown)} (known: {', '.join(EXPERIMENTS)})")
        if order not in ("experiment", "seed"):
            raise ValueError("order must be 'experiment' or 'seed'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA was asked for but is not available")
        if preset.validation:
            dataset = validation_split(dataset, preset.validation)
        self.preset, self.dataset, self.device, self.out = preset, dataset, device, Path(out)
        self.experiments = [e for e in EXPERIMENTS if e in set(experiments)]
        if first_seed < 0:
            raise ValueError("the first seed must be 0 or more")
        # Seeds first_seed, first_seed + 1, ...: a machine can take the seeds another has not
        # run, or reuse the Original of one seed kept in the model cache.
        self.seeds = list(range(first_seed, first_seed + (seeds if seeds is not None else preset.seeds)))
        self.time_budget, self.order, self.log, self.resume = time_budget, order, log, resume
        self.models = models  # trained Originals and Retrains kept across runs (None: this run only)
        self.base_unlearn = UnlearnConfig.model_validate(_merge(preset.unlearn, {"precision": preset.precision}))
        self._train_cfg(0)  # a bad `train` override fails here, before anything runs
        self.mean, self.std = dataset.channel_stats()
        self._originals: dict[tuple, tuple[nn.Module, float]] = {}
        self._retrains: dict[tuple, tuple[nn.Module, float]] = {}
        self._retained: dict[tuple, RetainedData] = {}
        self._synthetic: dict[tuple, tuple[Synthetic, float]] = {}
        self._measured: dict[tuple, dict] = {}
        self.raw: list[dict] = []
        self.failures: list[dict] = []
        self.meta: dict = {}
        self._kept: list[dict] = []  # with `resume`: the earlier run's finished rows
        if resume:
            self._check_resumable()  # a mismatch fails here, before anything runs

    # --- the plan ---------------------------------------------------------------------------

    def _uisps_cfg(self, steps: int | None = None, **changes: object) -> UnlearnConfig:
        inversion = changes.pop("inversion", None)
        # only the fields the preset set, so that a `preset` among the changes fills in the rest
        fields = self.base_unlearn.model_dump(exclude_unset=True)
        if changes.get("preset") == "paper":  # the paper's pass read literally: no override of the pass reaches it
            fields = {name: value for name, value in fields.items() if name not in PAPER_PASS}
        fields.update(changes)
        if steps is not None:  # a sweep's length; otherwise the preset's own
            fields["steps"] = steps
        cfg = UnlearnConfig.model_validate(fields)
        if inversion:  # validated: a negative weight would silently turn a term around
            cfg = cfg.model_copy(update={"inversion": InversionConfig.model_validate(
                {**cfg.inversion.model_dump(), **inversion})})
        return cfg

    def units(self, experiment: str, seed: int) -> list[Unit]:
        p = self.preset
        out: list[Unit] = []

        def refs(arch: str, forget: tuple[int, ...], fraction: float = 1.0, setting: str = "") -> None:
            out.append(Unit(experiment, arch, forget, "original", setting or "trained on D", seed, "original"))
            out.append(Unit(experiment, arch, forget, "retrain", setting or "trained on D_r", seed, "retrain", fraction))

        if experiment == "main":
            for arch in p.archs:
                for forget in p.main_forget:
                    for m in p.main_methods:
                        if m in ("original", "retrain"):
                            out.append(Unit(experiment, arch, forget, m,
                                            "trained on D" if m == "original" else "trained on D_r", seed, m))
                        elif m == "uisps":  # the run's base pass: the default, unless the run set another
                            base = "preset=paper" if self.base_unlearn.preset == "paper" else "default"
                            out.append(Unit(experiment, arch, forget, m, base, seed, "uisps",
                                            unlearn=self._uisps_cfg()))
                        elif m == "uisps-paper":
                            out.append(Unit(experiment, arch, forget, m, "preset=paper", seed, "uisps",
                                            unlearn=self._uisps_cfg(preset="paper")))
                        else:
                            out.append(Unit(experiment, arch, forget, m, self._baseline_setting(m), seed, m))
        elif experiment == "tune":
            for arch in p.tune_archs or p.archs:
                for forget in p.main_forget:
                    refs(arch, forget)
                    for name, changes in p.tune_variants:
                        out.append(Unit(experiment, arch, forget, "uisps", name, seed, "uisps",
                                        unlearn=self._uisps_cfg(**changes)))
        elif experiment == "ablation":
            for forget in p.ablation_forget:
                refs(p.sweep_arch, forget)
                for ent in (True, False):
                    for sps in (True, False):
                        setting = f"entropy={'on' if ent else 'off'}, sps={'on' if sps else 'off'}"
                        inv = None if ent else {"lambda_entropy": 0.0}
                        cfg = self._uisps_cfg(p.sweep_steps, sps=sps, inversion=inv)
                        out.append(Unit(experiment, p.sweep_arch, forget, "uisps", setting, seed, "uisps", unlearn=cfg))
        elif experiment == "alpha":
            refs(p.sweep_arch, p.sweep_forget)
            for a in p.alphas:
                out.append(Unit(experiment, p.sweep_arch, p.sweep_forget, "uisps", f"alpha={a:g}", seed, "uisps",
                                unlearn=self._uisps_cfg(p.sweep_steps, alpha=a)))
        elif experiment == "lambda":
            refs(p.sweep_arch, p.sweep_forget)
            for l1 in p.lambda_bn:
                for l2 in p.lambda_entropy:
                    cfg = self._uisps_cfg(p.sweep_steps, inversion={"lambda_bn": l1, "lambda_entropy": l2})
                    out.append(Unit(experiment, p.sweep_arch, p.sweep_forget, "uisps",
                                    f"lambda1={l1:g}, lambda2={l2:g}", seed, "uisps", unlearn=cfg))
        elif experiment == "retain_fraction":
            for frac in p.retain_fractions:
                setting = f"retain={round(100 * frac)}%"
                for m in p.retain_methods:
                    if m == "original":
                        out.append(Unit(experiment, p.sweep_arch, p.retain_forget, m, setting, seed, "original"))
                    else:
                        cfg = self._uisps_cfg(p.sweep_steps) if m == "uisps" else None
                        changed = self._baseline_setting(m)
                        label = setting if changed == "default" else f"{setting}, {changed}"
                        out.append(Unit(experiment, p.sweep_arch, p.retain_forget, m, label, seed, m, frac, cfg))
        return out

    def _baseline_setting(self, kind: str) -> str:
        """A baseline row's setting: "default", or what this run changed of the method's settings
        (e.g. "min_steps=350"), so that rows run with other budgets never read as the default."""
        name = "bad_teacher" if kind == "bad_teacher_sps" else kind  # the Preset field of its settings
        if not is_dataclass(getattr(self.preset, name, None)):
            return "default"  # the head mask has none
        ours, default = asdict(getattr(self.preset, name)), asdict(getattr(Preset(), name))
        changed = [f"{k}={_setting_value(v)}" for k, v in ours.items() if k not in _NOT_A_SETTING and v != default[k]]
        return ", ".join(changed) or "default"

    def plan(self, seeds: list[int] | None = None) -> list[Unit]:
        seeds = self.seeds if seeds is None else seeds
        if self.order == "experiment":
            return [u for e in self.experiments for s in seeds for u in self.units(e, s)]
        return [u for s in seeds for e in self.experiments for u in self.units(e, s)]

    # --- cached ingredients -------------------------------------------------------------------

    def _train_cfg(self, seed: int) -> TrainConfig:
        return TrainConfig.model_validate({**self.preset.train, "seed": seed, "precision": self.preset.precision})

    def original(self, arch: str, seed: int) -> tuple[nn.Module, float]:
        key = (arch, seed)
        if key not in self._originals:
            cfg = self._train_cfg(seed)
            self._originals[key] = self._trained(
                "original", arch, cfg, self.dataset.train, self.dataset.num_classes, self.dataset.flip,
                lambda: train_model(self.dataset, arch, cfg, self.device)[0])
        return self._originals[key]

    def _trained(self, kind: str, arch: str, cfg: TrainConfig, data: Split, num_classes: int, flip: bool,
                 train_fn: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
        """The model `train_fn` trains and its training seconds, from `self.models` when it holds them."""
        if self.models is None:
            return _timed(train_fn, self.device)
        recipe = {
            "kind": kind, "arch": arch, "train": cfg.model_dump(mode="json"),
            "samples": samples_fingerprint(data.x, data.y), "num_classes": num_classes, "flip": flip,
            "mean": self.mean, "std": self.std, "device": str(self.device), "device_name": device_name(self.device),
            "cpu": cpu_name(), "torch": torch.__version__, "code": _training_code(),
        }
        with torch.random.fork_rng(devices=[]):
            model = build_model(arch, int(data.x.shape[1]), num_classes)
        seconds = self.models.load(recipe, model)
        if seconds is not None:
            self.log(f"{kind} {arch} seed {cfg.seed}: trained model from the cache ({seconds:.0f} s when trained)")
            # the memory format training leaves, so that every later step computes the same
            return model.to(self.device, memory_format=torch.channels_last).eval(), seconds
        model, seconds = _timed(train_fn, self.device)
        self.models.store(recipe, model, seconds)
        return model, seconds

    def retained(self, forget: tuple[int, ...], fraction: float, seed: int) -> RetainedData:
        key = (forget, fraction, seed if fraction < 1 else None)
        if key not in self._retained:
            full = retained_data(self.dataset, forget)
            if fraction < 1:
                full = replace(full, train=full.train.select(stratified_sample(full.train.y, fraction, seed)))
            self._retained[key] = full
        return self._retained[key]

    def retrain(self, arch: str, seed: int, forget: tuple[int, ...], fraction: float) -> tuple[nn.Module, float]:
        key = (arch, seed, forget, fraction)
        if key not in self._retrains:
            retained = self.retained(forget, fraction, seed)
            cfg = self._train_cfg(seed)
            self._retrains[key] = self._trained(
                "retrain", arch, cfg, retained.train, retained.num_classes, retained.flip,
                lambda: B.retrain(None, arch, retained, list(forget), self.mean, self.std, self.device, seed, cfg))
        return self._retrains[key]

    def synthetic(self, arch: str, seed: int, forget: tuple[int, ...], inversion: InversionConfig) -> tuple[Synthetic, float]:
        key = (arch, seed, forget, inversion.model_dump_json())
        if key not in self._synthetic:
            model, _ = self.original(arch, seed)
            bf16 = use_bf16(self.preset.precision, self.device)
            _sync(self.device)
            start = time.perf_counter()
            syn = invert(model, list(forget), self.dataset.input_shape, inversion, seed, bf16)
            _sync(self.device)
            self._synthetic[key] = (syn, time.perf_counter() - start)
        return self._synthetic[key]

    # --- one unit -----------------------------------------------------------------------------

    def measure(
        self, model: nn.Module, forget: tuple[int, ...], seed: int, relearn: bool, members: Split | None = None
    ) -> dict:
        """`members`: the retained training samples `model` was trained on, where not all of D_r."""
        ds, dev = self.dataset, self.device
        ev = evaluate(model, ds, list(forget), self.mean, self.std, dev, members=members)
        probe = feature_probe(model, ds.test, list(forget), self.mean, self.std, dev, seed, self.preset.probe)
        row = {
            "acc_retain": ev.acc_retain, "acc_forget": ev.acc_forget, "mia": ev.mia,
            "probe": probe.accuracy, "probe_balanced": probe.balanced_accuracy,
            "relearn_steps": None, "relearn_reached": None, "forget_histogram": ev.forget_histogram,
        }
        if relearn:
            cfg = replace(self.preset.relearn, precision=self.preset.precision)
            rl = relearn_steps(model, ds.test, list(forget), self.mean, self.std, dev, seed, cfg)
            row.update(relearn_steps=rl.steps, relearn_reached=rl.reached)
        return row

    def _method_kwargs(self, unit: Unit) -> dict:
        p, prec = self.preset, self.preset.precision
        kind = unit.kind
        if kind == "finetune":
            return {"cfg": replace(p.finetune, precision=prec)}
        if kind == "amnesiac":
            return {"cfg": replace(p.amnesiac, precision=prec),
                    "forget_train": self.dataset.train.with_labels(unit.forget)}
        if kind == "unsir":
            return {"cfg": replace(p.unsir, precision=prec)}
        if kind == "fisher":
            return {"cfg": p.fisher}
        if kind in ("bad_teacher", "bad_teacher_sps"):  # the forget side is UISPS's D_g, shared
            return {"cfg": replace(p.bad_teacher, precision=prec, inversion=self.base_unlearn.inversion)}
        if kind == "uisps":
            return {"cfg": unit.unlearn}
        return {}

    def run_unit(self, unit: Unit) -> dict:
        relearn = unit.experiment in self.preset.relearn_experiments
        info: dict = {}
        if unit.kind in ("original", "retrain"):
            if unit.kind == "original":
                model, seconds = self.original(unit.arch, unit.seed)
                mkey: tuple = ("original", unit.arch, unit.seed, unit.forget)
            else:
                model, seconds = self.retrain(unit.arch, unit.seed, unit.forget, unit.retain_fraction)
                mkey = ("retrain", unit.arch, unit.seed, unit.forget, unit.retain_fraction)
            if mkey not in self._measured or (relearn and self._measured[mkey]["relearn_steps"] is None):
                # a Retrain on a fraction of D_r: its MIA members are that fraction, not all of D_r
                members = None
                if unit.kind == "retrain" and unit.retain_fraction < 1:
                    members = self.retained(unit.forget, unit.retain_fraction, unit.seed).train
                self._measured[mkey] = self.measure(model, unit.forget, unit.seed, relearn, members)
            metrics = dict(self._measured[mkey])
            if not relearn:
                metrics.update(relearn_steps=None, relearn_reached=None)
        else:
            spec = B.METHODS[unit.kind]
            base, _ = self.original(unit.arch, unit.seed)
            retained = self.retained(unit.forget, unit.retain_fraction, unit.seed)
            kwargs = self._method_kwargs(unit)
            inversion_seconds = 0.0
            if spec.uses_inversion:
                inv = kwargs["cfg"].inversion
                syn, inversion_seconds = self.synthetic(unit.arch, unit.seed, unit.forget, inv)
                kwargs["synthetic"] = syn
            model = copy.deepcopy(base)
            _sync(self.device)
            start = time.perf_counter()
            model = spec.fn(model, unit.arch, retained, list(unit.forget), self.mean, self.std, self.device,
                            unit.seed, info=info, **kwargs)
            _sync(self.device)
            seconds = time.perf_counter() - start + inversion_seconds
            if spec.uses_inversion:
                info["inversion_seconds"] = inversion_seconds
            metrics = self.measure(model, unit.forget, unit.seed, relearn)
            del model
        return {
            "experiment": unit.experiment, "arch": unit.arch, "forget": list(unit.forget),
            "method": unit.method, "setting": unit.setting, "seed": unit.seed,
            "retain_fraction": unit.retain_fraction, "zero_glance": unit.zero_glance,
            **metrics, "seconds": seconds,
            "steps": info.get("steps"), "frozen_fraction": info.get("frozen_fraction"),
            "inversion_seconds": info.get("inversion_seconds"),
            # a resumed run keeps rows of earlier runs, perhaps on another machine of the same kind
            "device": device_name(self.device),
        }

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.preset.cudnn_benchmark
            torch.set_float32_matmul_precision("high")
        self.out.mkdir(parents=True, exist_ok=True)
        raw_path = self.out / "paper-raw.jsonl"
        units = self.plan()
        start = time.monotonic()
        self.meta = self._meta(len(units))
        if self.resume:
            units = self._resumed(units)
        else:
            raw_path.write_text("")
        skipped: list[Unit] = []
        current = None
        for i, unit in enumerate(units):
            elapsed = time.monotonic() - start
            if self.time_budget is not None and elapsed > self.time_budget:
                skipped = units[i:]
                self.log(f"time budget of {self.time_budget:.0f} s spent after {elapsed:.0f} s: "
                         f"{len(skipped)} of {len(units)} planned rows not started")
                break
            if current is not None and unit.experiment != current:  # an experiment (block) ended
                self._finish(start, units, skipped, plots=True)
            current = unit.experiment
            try:
                row = self.run_unit(unit)
            except Exception as exc:  # one failing row (a diverged setting, say) must not end the run
                self.failures.append({"unit": _unit_name(unit), "error": f"{type(exc).__name__}: {exc}"})
                self.log(f"FAILED {_unit_name(unit)}: {type(exc).__name__}: {exc}")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            self.raw.append(row)
            with raw_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self._finish(start, units, skipped, plots=False)
            self.log(
                f"[{time.monotonic() - start:7.1f}s] {unit.experiment:<15} {unit.arch:<8} "
                f"f{''.join(map(str, unit.forget)):<8} {unit.method:<15} {unit.setting:<28} seed {unit.seed}: "
                f"A_Dr {row['acc_retain']:6.2f}  A_Df {row['acc_forget']:6.2f}  MIA {row['mia']:6.2f}  "
                f"probe {row['probe']:6.2f}  relearn {row['relearn_steps']}  ({row['seconds']:.1f} s)"
            )
        self._finish(start, units, skipped, plots=True)
        return aggregate(self.raw)

    def _check_resumable(self) -> None:
        earlier_meta = self.out / "paper-run.json"
        if not earlier_meta.exists() or not (self.out / "paper-raw.jsonl").exists():
            raise ValueError(f"nothing to resume in {self.out} (no paper-run.json and paper-raw.jsonl)")
        earlier, now = json.loads(earlier_meta.read_text()), self._meta(0)
        differs = [k for k in _RESUME_MUST_MATCH if _jsonable_roundtrip(earlier.get(k)) != _jsonable_roundtrip(now[k])]
        if "method_code" in differs:
            also = [k for k in differs if k != "method_code"]
            raise ValueError(f"cannot resume {self.out}: the code that computes its rows (methods, data, measures) "
                             "changed since its earlier run, and its rows would be averaged with other code's"
                             + (f" (it also used other {', '.join(also)})" if also else "") + "; give another --out")
        if differs:
            raise ValueError(f"cannot resume {self.out}: its earlier run used other {', '.join(differs)}")
        # rows of the seeds below this run's first are kept, not run again
        planned = {_unit_key(u) for u in self.plan(list(range(self.seeds[-1] + 1)) if self.seeds else [])}
        self._kept = self._earlier_rows()
        unplanned = [row for row in self._kept if _row_key(row) not in planned]
        if unplanned:
            # Finished rows are hours of compute: a resume never throws them away.
            raise ValueError(f"cannot resume {self.out}: {len(unplanned)} of its finished rows are not in this "
                             f"run's plan (fewer --seeds, or a later --first-seed?), and resuming would drop them")

    def _earlier_rows(self) -> list[dict]:
        """The finished rows on disk; a last line cut short (the machine stopped mid-write) is skipped."""
        lines = (self.out / "paper-raw.jsonl").read_text().splitlines()
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"cannot resume {self.out}: line {i + 1} of paper-raw.jsonl is not JSON") from None
                self.log(f"resuming {self.out}: its last line was cut short; that row runs again")
        return rows

    def _resumed(self, units: list[Unit]) -> list[Unit]:
        """Keep the rows an earlier run of the same settings left in `out`; return the units still to run.

        Each (row, seed) is an independent measurement (its Original and Retrain are trained from
        the seed), so a run cut off by its budget or by the machine can be continued, or given
        more seeds, without redoing what is on disk. An earlier run with other settings, or with
        rows this run does not plan, is refused (`_check_resumable`, which read the rows kept)
        rather than mixed in or cut.
        """
        earlier = json.loads((self.out / "paper-run.json").read_text())
        kept = self._kept
        done = {_row_key(row) for row in kept}
        todo = [u for u in units if _unit_key(u) not in done]
        # rows kept from seeds below this run's are finished rows of this run's tables too
        self.meta["planned_rows"] += len(kept) - (len(units) - len(todo))
        self._warn_of_missing_lower_seeds(done)
        self.raw = list(kept)
        # rewritten without a last line cut short, which the next row would otherwise follow
        _write_atomic(self.out / "paper-raw.jsonl", "".join(json.dumps(row) + "\n" for row in kept))
        self.meta["resumed"] = {"rows_kept": len(kept), "earlier_device": earlier.get("device")}
        self.log(f"resuming {self.out}: {len(kept)} finished rows kept, {len(todo)} to run")
        return todo

    def _warn_of_missing_lower_seeds(self, done: set[tuple]) -> None:
        lower = list(range(self.seeds[0])) if self.seeds else []
        missing = [u for u in self.plan(lower) if _unit_key(u) not in done]
        if missing:
            self.log(f"resuming {self.out}: {len(missing)} rows of seeds below {self.seeds[0]} are not finished and are "
                     f"not run now (--first-seed {min(u.seed for u in missing)} runs them)")

    def _meta(self, planned: int) -> dict:
        per_arch = {}
        for arch in {*self.preset.archs, self.preset.sweep_arch}:
            lr = self.base_unlearn.lr or unlearning_lr(arch, paper=self.base_unlearn.preset == "paper")
            per_arch[arch] = {"unlearning_lr": lr, "paper_preset_lr": unlearning_lr(arch, paper=True)}
        return {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "bf16": use_bf16(self.preset.precision, self.device),
            "preset": _jsonable(self.preset),
            "data": self.dataset.spec,
            "train_samples": len(self.dataset.train),
            "test_samples": len(self.dataset.test),
            "scored_on": "validation" if self.preset.validation else "test",
            "experiments": self.experiments,
            "seeds": len(self.seeds),
            "first_seed": self.seeds[0] if self.seeds else 0,
            "order": self.order,
            "time_budget_s": self.time_budget,
            "planned_rows": planned,
            "unlearn_config": self.base_unlearn.model_dump(),
            "unlearn_lr_by_arch": per_arch,
            "mia_definition": MIA_DEFINITION,
            "method_code": _method_code(),
        }

    def _finish(self, start: float, units: list[Unit], skipped: list[Unit], plots: bool) -> None:
        rows = aggregate(self.raw)
        self.meta.update(
            elapsed_s=time.monotonic() - start,
            finished_rows=len(self.raw),
            stopped_by_budget=bool(skipped),
            not_started={e: sum(u.experiment == e for u in skipped) for e in self.experiments if any(
                u.experiment == e for u in skipped)},
            pass_lengths=pass_lengths(self.raw),
            failures=self.failures,
            models_from_cache=self.models.hits if self.models is not None else 0,
            rows_by_device=rows_by_device(self.raw),
        )
        images = plot_prediction_distributions(rows, self.out, self.dataset.classes) if plots else self.meta.get("plots", [])
        self.meta["plots"] = images
        _write_atomic(self.out / "paper.json", json.dumps(rows, indent=1) + "\n")
        _write_atomic(self.out / "paper-run.json", json.dumps(self.meta, indent=1) + "\n")
        _write_atomic(self.out / "paper.md", markdown(rows, self.meta))


# --- aggregation and reports --------------------------------------------------------------------


def rows_by_device(raw: list[dict]) -> dict[str, int]:
    """How many finished rows each device made (rows written before rows named it: not recorded)."""
    counts: dict[str, int] = {}
    for row in raw:
        device = row.get("device") or "not recorded (an earlier run)"
        counts[device] = counts.get(device, 0) + 1
    return counts


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    arr = np.asarray(vals, dtype=float)
    # one seed has no spread to report: None, never a 0.0 that reads as "no spread"
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def aggregate(raw: list[dict]) -> list[dict]:
    """One row per (experiment, arch, forget, method, setting): means (and std) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in raw:
        key = (r["experiment"], r["arch"], tuple(r["forget"]), r["method"], r["setting"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (experiment, arch, forget, method, setting), rs in groups.items():
        row: dict = {"experiment": experiment, "arch": arch, "forget": list(forget), "method": method,
                     "setting": setting, "seeds": len(rs), "seed_ids": sorted(r["seed"] for r in rs)}
        for k in ("acc_retain", "acc_forget", "mia", "probe", "probe_balanced", "relearn_steps", "seconds"):
            row[k], row[f"{k}_std"] = _mean_std([r.get(k) for r in rs])
        for k in ("steps", "frozen_fraction"):
            row[k] = _mean_std([r.get(k) for r in rs])[0]
        reached = [r["relearn_reached"] for r in rs if r.get("relearn_reached") is not None]
        row["relearn_capped"] = sum(not x for x in reached) if reached else None
        row["zero_glance"] = rs[0]["zero_glance"]
        row["retain_fraction"] = rs[0].get("retain_fraction", 1.0)
        hist = [r["forget_histogram"] for r in rs if r.get("forget_histogram")]
        row["forget_histogram"] = [int(sum(col)) for col in zip(*hist, strict=True)] if hist else []
        rows.append(row)
    return rows


def pass_lengths(raw: list[dict]) -> dict:
    """Optimiser steps of every method that trains, per (experiment, arch, method): what `epochs=1`
    meant, and how the budgets of UISPS and the baselines compare."""
    out: dict[str, list[int]] = {}
    for r in raw:
        if r.get("steps") is not None:
            out.setdefault(f"{r['experiment']}/{r['arch']}/{r['method']}", []).append(int(r["steps"]))
    return {k: sorted(set(v)) for k, v in out.items()}


def _fmt(value: float | None, std: float | None = None, seeds: int = 1, digits: int = 2) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if seeds > 1 and std is not None else text


TITLES = {
    "main": "Main comparison (paper Tables I and IV)",
    "tune": "UISPS pass settings (what the default is chosen from)",
    "ablation": "Ablation: entropy term and SPS (paper Table II)",
    "alpha": "SPS threshold alpha (paper Table X)",
    "lambda": "Inversion weights lambda1 (BN) x lambda2 (entropy) (paper Table XII)",
    "retain_fraction": "Fraction of D_r available (paper Tables VI and VII)",
}


def _dumps(obj: object) -> str:
    """Indented JSON with lists of scalars (and lists of those) kept on one line."""
    text = json.dumps(obj, indent=1)
    flat = re.compile(r"\[\s*([^\[\]{}]*?)\s*\]")
    nested = re.compile(r"\[\s*((?:\[[^\[\]{}\n]*\],?\s*)+)\]")
    text = flat.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return nested.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def _frozen_cell(row: dict) -> str:
    """The share of parameters SPS froze (what alpha acts through), for the rows that froze any."""
    frozen = row.get("frozen_fraction")
    return "-" if frozen is None else f"{100 * frozen:.1f}"


def _experiment_note(exp: str, preset: dict) -> str:
    """What a reader of a sweep's table must know to compare it with the paper's."""
    paper_pass, steps = _runs_paper_pass(preset), preset.get("sweep_steps")
    on_default = ("Every UISPS row runs the paper's pass (preset=paper: one epoch at the paper's constant rate, "
                  "no output rows reset)" if paper_pass else
                  "Every UISPS row runs the default pass (forgotten output rows reset, cosine rate, soft labels "
                  "without the forgotten classes, 16 synthetic samples per batch), not the paper's,")
    on_default += (f" for {steps} steps" if steps is not None else "") + " with only the setting named changed."
    if exp == "ablation":
        return (on_default + " entropy=off sets lambda2 to 0 in the inversion; sps=off freezes nothing. The "
                "entropy term raises the entropy of its subset's predictions (`entropy_sign` 1, the paper's text "
                "and Fig. 2; eq. 5 as printed would lower it).")
    if exp == "alpha":
        return (on_default + " alpha is the SPS threshold (eq. 12): a parameter is frozen where its normalised "
                "retained-data Fisher exceeds alpha times its normalised synthetic-data Fisher, so a lower alpha "
                "freezes more (the frozen % column).")
    if exp == "lambda":
        l1, l2 = preset.get("lambda_bn", []), preset.get("lambda_entropy", [])
        held = "holds" if 0.01 in l1 and 0.05 in l2 else "leaves out"
        return (on_default + f" lambda1 in {l1} and lambda2 in {l2}: a {len(l1)} x {len(l2)} grid, a subset "
                f"of the paper's 5 x 5 that {held} its default (0.01, 0.05).")
    if exp == "retain_fraction":
        uisps = (f"{steps} steps" if steps is not None else "one epoch of the fraction" if paper_pass
                 else "floored at 350 steps")
        budget = (f"UISPS's pass is {uisps} at every fraction; the baselines' steps are in the pass lengths "
                  "below: where they differ, so do the budgets.")
        return (on_default + " Retrain trains on the fraction; Fine-tune, UNSIR and UISPS start from the "
                "Original and see only the fraction (the same stratified, seeded subset). " + budget)
    return ""


def _runs_paper_pass(preset: dict) -> bool:
    """Whether the run's base UISPS pass (its `uisps` and sweep rows) is the paper's."""
    return (preset.get("unlearn") or {}).get("preset") == "paper"


def _zero_glance_cell(row: dict) -> str:
    if row["method"] == "original":
        return "n/a"  # trained on D: nothing was unlearned, with or without a glance
    return "yes" if row["zero_glance"] else "no"


def markdown(rows: list[dict], meta: dict) -> str:
    preset = meta.get("preset", {})
    lines = [
        "# UISPS paper benchmark",
        "",
        f"- device: **{meta.get('device')}** (torch {meta.get('torch')}, bf16 autocast: {meta.get('bf16')})",
        f"- preset: **{preset.get('name')}**, data: `{meta.get('data')}` ({meta.get('train_samples')} train / "
        f"{meta.get('test_samples')} test images), seeds requested: {meta.get('seeds')}"
        + (f" (from seed {meta['first_seed']})" if meta.get("first_seed") else "")
        + f", order: {meta.get('order')}-major",
        *([f"- **scored on a validation split**, not the test split: {preset.get('validation'):.0%} of each "
           "class's training images held out (seed 0); every model trained on the rest. Wherever the columns "
           "below say \"test split\", read this held-out split"] if meta.get("scored_on") == "validation" else []),
        f"- Original and Retrain: core.training (SGD, Nesterov, one-cycle), {json.dumps(preset.get('train'))}",
        f"- rows finished: {meta.get('finished_rows')} of {meta.get('planned_rows')} planned; "
        f"this run took {meta.get('elapsed_s', 0):.0f} s"
        + (f" (time budget {meta['time_budget_s']:.0f} s)" if meta.get("time_budget_s") else ""),
    ]
    by_device = meta.get("rows_by_device") or {}
    if len(by_device) > 1 or (by_device and meta.get("device") not in by_device):
        # kept rows of an earlier (resumed) run: their seconds were measured there
        lines.append("- rows by device: " + "; ".join(f"{device}: {n}" for device, n in by_device.items()))
    if meta.get("models_from_cache"):
        lines.append(f"- Original/Retrain models read from the model cache: {meta['models_from_cache']} "
                     "(their seconds are those measured when they were trained, on the same device)")
    if meta.get("stopped_by_budget"):
        lines.append(f"- **stopped by the time budget**: rows not started, per experiment: {meta.get('not_started')}")
    for failure in meta.get("failures") or []:
        lines.append(f"- **failed** (no row): `{failure['unit']}`: {failure['error']}")
    lines += [
        "",
        "Columns: A_Dr and A_Df are accuracies (%) on the test split (retained / forgotten classes); "
        "MIA (%) is defined below; probe is the accuracy (%) of a logistic-regression probe on the penultimate "
        "features telling forgotten classes from the rest (held-out half of the test split), and probe (bal.) "
        "its balanced accuracy, the mean of its recall on the forgotten classes and on the rest: the probe is "
        "fitted with balanced class weights, so with one forgotten class of ten its plain accuracy mostly "
        "counts retained samples it took for forgotten ones, and the balanced figure is the one that says how "
        "well the forgotten classes can still be found; relearn is the number of fine-tuning steps until A_Df on held-out forgotten test samples "
        "passes 50 % (a trailing `*` marks seeds that hit the cap; `head_mask` is fine-tuned without its mask, "
        "which is not a weight); seconds is the method's wall time (for methods that use the inversion, including "
        "it; for Original and Retrain, their training, the run's first one with CUDA start-up and cuDNN tuning). "
        "Values are means over seeds, ± the sample standard deviation (ddof=1) where there are several; a "
        "probe that always answered 'the rest' would score 90 % with one forgotten class of ten and 70 % with "
        "three (its balanced accuracy would be 50 %). zero-glance: the method "
        "reads no forgotten sample (Amnesiac reads the forgotten training samples; the Original is no method). `bad_teacher` and "
        "`bad_teacher_sps` use UISPS's inversion D_g as their forget side.",
        "",
        f"**MIA**: {meta.get('mia_definition')}. Retrain's MIA is in every table as the reference.",
        "",
    ]
    for exp in EXPERIMENTS:
        exp_rows = [r for r in rows if r["experiment"] == exp]
        if not exp_rows:
            continue
        lines += [f"## {TITLES[exp]}", ""]
        note = _experiment_note(exp, preset)
        lines += [note, ""] if note else []
        lines += ["| arch | forget | method | setting | A_Dr | A_Df | MIA | probe | probe (bal.) | relearn | seconds "
                  "| frozen % | zero-glance | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in exp_rows:
            relearn = _fmt(r["relearn_steps"], r.get("relearn_steps_std"), r["seeds"], digits=0)
            relearn += "*" if r["relearn_steps"] is not None and r.get("relearn_capped") else ""
            lines.append(
                f"| {r['arch']} | {','.join(map(str, r['forget']))} | {r['method']} | {r['setting']} | "
                f"{_fmt(r['acc_retain'], r['acc_retain_std'], r['seeds'])} | "
                f"{_fmt(r['acc_forget'], r['acc_forget_std'], r['seeds'])} | {_fmt(r['mia'], r['mia_std'], r['seeds'])} | "
                f"{_fmt(r['probe'], r.get('probe_std'), r['seeds'])} | "
                f"{_fmt(r.get('probe_balanced'), r.get('probe_balanced_std'), r['seeds'])} | {relearn} | "
                f"{_fmt(r['seconds'], r.get('seconds_std'), r['seeds'], digits=1)} | {_frozen_cell(r)} | "
                f"{_zero_glance_cell(r)} | {r['seeds']} |"
            )
        lines.append("")
    plots = meta.get("plots") or []
    lines += ["## Prediction distribution on the forgotten test samples (paper Fig. 4/5)", ""]
    if plots:
        lines += [f"![{p}]({p})" for p in plots] + [""]
    else:
        lines += ["(no plots: matplotlib is not installed, or no main rows finished)", ""]
    lines += [
        "## UISPS settings of this run",
        "",
        ("Pass length: this run's base pass is the paper's (`unlearn.preset` = paper), so `uisps` rows, like "
         "`uisps-paper` rows, run one epoch at the paper's rate held constant. " if _runs_paper_pass(preset) else
         "Pass length: `uisps` rows use the default pass, one epoch of the retained data floored at `min_steps` (350, "
         "the paper's step count for one epoch of full CIFAR-10), with a cosine-decaying rate and soft labels without "
         "the forgotten classes; `uisps-paper` rows use `preset=paper`, the paper's pass read literally (one epoch, "
         "the paper's rate held constant). ") +
        f"Outside `main` and `tune` the pass is {'the base pass' if preset.get('sweep_steps') is None else 'the base pass for ' + str(preset.get('sweep_steps')) + ' steps'}. "
        "Optimiser steps used, per experiment/arch/method (UISPS and every baseline that trains; Fisher forgetting "
        "and the head mask take none):",
        "",
        "```json",
        _dumps(meta.get("pass_lengths", {})),
        "```",
        "",
        f"Unlearning learning rate by architecture: `unlearning_lr` for the rows of the base UnlearnConfig "
        f"below, `paper_preset_lr` for the preset=paper rows (paper Sec. V-A): "
        f"{json.dumps(meta.get('unlearn_lr_by_arch'))}. The base UnlearnConfig (ablation/alpha/lambda rows change "
        "only the field their setting names):",
        "",
        "```json",
        _dumps(meta.get("unlearn_config")),
        "```",
        "",
        "The whole preset (baseline settings, probes):",
        "",
        "```json",
        _dumps(preset),
        "```",
        "",
    ]
    return "\n".join(lines)


PLOT_METHODS = ("retrain", "uisps", "uisps-paper", "unsir")


def plot_prediction_distributions(rows: list[dict], out: Path, classes: list[str]) -> list[str]:
    """One PNG per (arch, forget set) of `main`: share of forgotten test samples per predicted
    class for Retrain, UISPS and UNSIR (paper Fig. 4/5). Returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    combos: dict[tuple, dict[str, list[int]]] = {}
    for r in rows:
        if r["experiment"] == "main" and r["method"] in PLOT_METHODS and r["forget_histogram"]:
            combos.setdefault((r["arch"], tuple(r["forget"])), {})[r["method"]] = r["forget_histogram"]
    for (arch, forget), hists in combos.items():
        methods = [m for m in PLOT_METHODS if m in hists]
        n = len(classes)
        fig, ax = plt.subplots(figsize=(8, 3.2))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            h = np.asarray(hists[m], dtype=float)
            share = 100 * h / max(1.0, h.sum())
            ax.bar(np.arange(n) + (i - (len(methods) - 1) / 2) * width, share, width, label=m)
        ax.set_xticks(np.arange(n), [f"{c}{'*' if i in forget else ''}" for i, c in enumerate(classes)],
                      rotation=30, fontsize=8)
        ax.set_ylabel("% of forgotten test samples")
        ax.set_title(f"{arch}, forget {list(forget)} (* forgotten): predicted class")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"pred-dist-{arch}-f{''.join(map(str, forget))}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names
