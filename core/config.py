"""Every UISPS hyperparameter in one typed config: the paper's (and design.md sec. 1), except the
unlearning pass, whose default was chosen by measurement; `preset="paper"` restores the paper's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, model_validator

# A request's overrides and the configuration its job used are stated in its deletion certificate,
# signed as RFC 8785 JSON, whose numbers are IEEE doubles: an integer with no other bound is kept
# within what a double holds exactly (core.certificates.MAX_JCS_INTEGER).
JSON_SAFE_INTEGER = 2**53 - 1

# The paper's pass read literally (Sec. IV-C and V-A): one epoch of the retained data at the
# architecture's rate (PAPER_UNLEARN_LR) held constant, D'_g shuffled into that epoch once, eq. 13's
# soft labels over every class. The other fields' defaults are the paper's already.
PAPER_PASS: dict[str, object] = {
    "lr": None, "steps": None, "epochs": 1.0, "min_steps": 1, "synthetic_per_batch": 0,
    "lr_schedule": "constant", "relabel_exclude_forgotten": False, "bn_mode": "train", "reset_head": False,
}


class InversionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_per_class: int = Field(32, ge=1, le=1024, description="synthetic samples per forget label")
    iterations: int = Field(1000, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0, description="Adam learning rate on the images")
    lambda_bn: float = Field(0.01, ge=0, description="lambda1: weight of the BatchNorm-statistics term")
    lambda_entropy: float = Field(0.05, ge=0, description="lambda2: weight of the entropy term")
    entropy_fraction: float = Field(0.5, ge=0, le=1, description="share of each class's samples in the entropy subset")
    # +1 raises the subset's entropy (the paper's text and Fig. 2); -1 lowers it (eq. 5 as printed).
    entropy_sign: Literal[1, -1] = 1
    # DeepInversion image priors: not in the paper, off by default.
    jitter: int = Field(0, ge=0, le=JSON_SAFE_INTEGER, description="random shift of the batch by up to this many pixels per step")
    flip: bool = False
    tv_weight: float = Field(0.0, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    # All forget labels in one batch with per-class BN statistics: the same optimisation as one
    # batch per label (the losses of different groups do not interact), K times fewer launches.
    batched: bool = True
    # On CUDA, replay one captured CUDA graph per iteration (same arithmetic, no launch overhead);
    # not with jitter/flip, whose random choices are made on the host.
    cuda_graph: bool = True


class UnlearnConfig(BaseModel):
    """The default pass is longer and faster than the paper's and decays its rate, which is what
    makes it forget on data of CIFAR-10's size (docs/algorithm.md); `preset="paper"` gives the
    paper's pass read literally (PAPER_PASS, the paper's rates by architecture). Fields given
    beside a preset override it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: Literal["default", "paper"] = "default"
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    alpha: float = Field(1.5, gt=0, description="freeze where norm_r > alpha * norm_g (eq. 12)")
    sps: bool = Field(True, description="selective parameter suppression on/off (ablation)")
    fisher_retain_size: int | None = Field(
        None, ge=1, le=100_000,
        description="size of the stratified retained subset D'_r; default n_per_class per retained class, at most 2048",
    )
    fisher_chunk: int = Field(16, ge=1, le=1024, description="samples per vmap chunk of per-sample gradients")
    lr: float | None = Field(None, gt=0, description="unlearning learning rate; default by architecture "
                             "(core.architectures.unlearning_lr; the paper's under preset=paper)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=2, le=4096)
    epochs: float = Field(1.0, gt=0, le=100, description="length of the pass in epochs of the retained data, "
                          "counted in batches of batch_size (epochs_equivalent reports the retained share)")
    steps: int | None = Field(None, ge=1, le=1_000_000, description="length of the pass in optimiser steps; overrides epochs")
    # A floor under `epochs`: 350 steps, the paper's one epoch of CIFAR-10's 45,000 retained
    # images. Smaller retained sets (the 5,085-image subset's epoch is ~36 steps, digits' 10) do
    # not forget in one of their epochs; full CIFAR-10 gets the paper's 352 steps.
    min_steps: int = Field(350, ge=1, le=1_000_000)
    # How D'_g enters the epoch. 0: shuffled into D_r once (the paper's loop read literally; with
    # 32 synthetic samples among thousands, most batches carry none). k > 0: every batch carries
    # k synthetic samples, cycling through D'_g.
    synthetic_per_batch: int = Field(16, ge=0, le=4096)
    # "train": BatchNorm running statistics follow the pass (a plain training epoch).
    # "frozen": BatchNorm layers stay in eval mode, so their running statistics do not move.
    bn_mode: Literal["train", "frozen"] = "train"
    # "constant": the pass runs at `lr` throughout (the paper's). "cosine": `lr` decays to 0 over
    # the pass, so a pass long and fast enough to forget ends by settling the retained classes
    # instead of leaving them wherever the last large step threw them.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # Eq. 13's soft labels come from a random model over all classes, so they keep ~1/C of their
    # mass on the very labels being forgotten. True removes the forgotten labels' share and
    # renormalises: D'_g then pulls the forgotten classes' outputs down instead of holding them.
    relabel_exclude_forgotten: bool = True
    # Below the output (docs/algorithm.md sec. 6). The pass rewrites what the head says about the
    # forgotten classes; the features under it can still tell them apart. dampen and feature_scrub
    # are off by default.
    # dampen: before the pass, every parameter element far more important to D'_g than to D'_r
    # (norm_g > dampen * norm_r, eq. 11's normalised Fisher) is scaled by dampen * norm_r / norm_g,
    # as Selective Synaptic Dampening does with real forget data; the pass then repairs D_r.
    dampen: float | None = Field(None, gt=1, description="dampen parameters where norm_g > dampen * norm_r")
    # feature_scrub: a loss term pulling D'_g's penultimate features onto the mean feature of the
    # batch's retained samples, so the forgotten classes lose their own region of feature space.
    feature_scrub: float = Field(0.0, ge=0, description="weight of the feature-scrub term (0: off)")
    # reset_head (on by default): before the pass, the output rows (weights and bias) of the
    # forgotten labels are re-initialised as a fresh model's and never frozen, so the pass pushes a
    # random row down as Retrain's training did, instead of nudging the trained class template just
    # below the others, from where a few steps of fine-tuning bring it back (docs/algorithm.md sec. 6).
    reset_head: bool = True
    # reset_blocks (0, off): before the pass, the last N blocks of the feature extractor (the
    # body's last N children that hold parameters) are re-initialised as a fresh model's and never
    # frozen, so the pass regrows them from D_r (and D'_g relabelled) alone, as Retrain grew them;
    # the layers below keep what they knew, SPS guarding them. Off: on smallcnn it moves probe and
    # relearn towards Retrain's at a cost in A_Dr (docs/algorithm.md sec. 6).
    reset_blocks: int = Field(0, ge=0, le=32, description="feature blocks to re-initialise (0: off)")
    augment: bool = True
    seed: int = Field(0, ge=-JSON_SAFE_INTEGER, le=JSON_SAFE_INTEGER)
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _room_for_retained_samples(self) -> UnlearnConfig:
        # A batch is batch_size samples, synthetic_per_batch of them from D'_g: with no room left
        # for D_r the pass would train on D'_g alone (and slice the retained data backwards).
        if self.synthetic_per_batch >= self.batch_size:
            raise ValueError(
                f"synthetic_per_batch ({self.synthetic_per_batch}) must be below batch_size "
                f"({self.batch_size}): every batch carries retained samples too"
            )
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _apply_preset(cls, data: Any, handler: ModelWrapValidatorHandler[UnlearnConfig]) -> UnlearnConfig:
        if not (isinstance(data, dict) and data.get("preset") == "paper"):
            return handler(data)
        config = handler({**PAPER_PASS, **data})
        # The preset's fields count as unset: what the caller set (exclude_unset, which a deletion
        # request stores) names the preset, not the values it stands for today.
        config.model_fields_set.difference_update(PAPER_PASS.keys() - data.keys())
        return config


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = True
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"

