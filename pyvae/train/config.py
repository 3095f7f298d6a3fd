"""The settings of a training run: :class:`TrainConfig`, one dataclass that validates itself.

:func:`pyvae.train.fit` takes one (or the same settings as keywords), ``config.json`` records it
under ``"train"``, and the flags of ``pyvae train`` are made from its fields (their ``help`` and
``metavar`` metadata).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pyvae._device import AUTOCAST_DTYPES
from pyvae._validate import check_int
from pyvae.train.schedules import KL_SCHEDULES, LR_SCHEDULES

OPTIMIZERS = ("adamw", "adagrad")


def _setting(default, help: str, metavar: str | None = None):
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`pyvae.train.fit` trains: length, optimizer, schedules, precision, evaluation,
    logging and checkpointing. Every value is checked when the config is made (a ValueError or
    TypeError naming the field).

    Attributes:
        steps, epochs: the run's length: exactly one of them. An epoch is
            ``len(train set) // (batch_size * world_size)`` steps (the last partial global
            batch of each epoch's permutation is dropped).
        stop_after: end this call once the total step count reaches ``stop_after`` (with a
            checkpoint), e.g. to fit a job's time limit; ``resume=True`` continues the run. The
            schedules still span ``steps`` / ``epochs``.
        batch_size: examples per step per process.
        optimizer: ``"adamw"`` or ``"adagrad"``.
        lr, weight_decay, betas: the learning rate; AdamW's decoupled weight decay (Adagrad's
            L2 penalty); AdamW's betas (unused by Adagrad).
        lr_schedule, lr_warmup_steps: ``"constant"``, ``"cosine"`` or ``"linear"`` decay to 0
            at the last step, after ``lr_warmup_steps`` steps of linear warm-up
            (:func:`pyvae.train.schedules.lr_factor`).
        kl_schedule, kl_warmup_steps, kl_cycle_steps, kl_cycle_ramp: the ``kl_weight`` passed to
            ``model.loss``: ``"linear"`` ramps from 0 to 1 over ``kl_warmup_steps`` (0: always
            1); ``"cyclical"`` repeats cycles of ``kl_cycle_steps`` steps, ramping over their
            first ``kl_cycle_ramp`` fraction (:func:`pyvae.train.schedules.kl_weight`).
        grad_clip: clip the gradients' global L2 norm to this (logged as ``grad_norm``).
        precision: ``"fp32"``; ``"bf16"`` or ``"fp16"`` run the loss under ``torch.autocast``
            on the model's device type (fp16 with a GradScaler).
        eval_fraction: hold out this fraction of the dataset for evaluation, chosen by ``seed``
            (:func:`pyvae.train.split_dataset`); or give ``fit`` an ``eval_dataset``.
        eval_every: evaluate every this many steps (None: only at the end of the run).
            Evaluation runs ``model.loss(x, kl_weight=1.0)`` in eval mode without gradients on
            ``eval_batches`` global batches (None: all full batches), with noise drawn from a
            fixed seed so that evaluations are comparable and training's RNG is untouched.
        log_every: write a training record every this many steps (and at the end of the
            run). A call that stops earlier (``stop_after``) keeps the steps since the last
            record in its checkpoint, so a resumed run logs the same records as an
            uninterrupted one.
        checkpoint_every: checkpoint every this many steps (None: only at the end of a call).
        resume: continue from ``out_dir/checkpoint`` when there is one (else start afresh, so
            a preemptible job can always pass True, also when it was stopped before its first
            checkpoint). A checkpoint that cannot be used — a dangling ``checkpoint`` link, a
            missing, truncated or damaged file, or no link although ``metrics.jsonl`` has
            records past the first checkpoint's step — is an error, and nothing in ``out_dir``
            is changed. Without ``resume``, an existing checkpoint is an error rather than
            being overwritten.
        seed: seeds the data order, the held-out split, and (for a fresh run) torch's, Python's
            and NumPy's global generators, which the model's sampling noise uses (each rank
            with its own seed derived from ``seed``).
        model_seed: when given, seeds the global generators (the sampling noise) instead of
            ``seed``, which then seeds only the data order and split; ``pyvae train`` also
            seeds the initial weights with it. :func:`pyvae.train.fit_grid` trains model k of
            a grid as ``fit`` with ``model_seed`` = that model's seed would.
        num_workers: DataLoader worker processes per rank.
        gather_global_batch: set ``model.gather_global_batch = True`` (models whose loss uses
            statistics of the whole batch, e.g. BetaTCVAE, then gather it across ranks).
    """

    steps: int | None = _setting(None, "length of the run in optimizer steps (or --epochs)", "N")
    epochs: int | None = _setting(None, "length of the run in epochs (or --steps)", "N")
    stop_after: int | None = _setting(
        None, "end this invocation at this step, with a checkpoint (continue with --resume); "
              "the schedules still span the whole run", "STEP")
    batch_size: int = _setting(64, "examples per step per process", "B")
    optimizer: str = _setting("adamw", "the optimizer", "{adamw,adagrad}")
    lr: float = _setting(1e-3, "learning rate", "LR")
    weight_decay: float = _setting(0.0, "weight decay (AdamW: decoupled; Adagrad: L2 penalty)",
                                   "W")
    betas: tuple[float, float] = _setting((0.9, 0.999), "AdamW betas", ("B1", "B2"))
    lr_schedule: str = _setting(
        "constant", "learning-rate decay after the warm-up (cosine/linear reach 0 at the last "
                    "step)", "{constant,cosine,linear}")
    lr_warmup_steps: int = _setting(0, "steps of linear learning-rate warm-up", "N")
    kl_schedule: str = _setting(
        "linear", "KL-weight schedule: linear warm-up, or cyclical annealing (Fu et al. 2019)",
        "{linear,cyclical}")
    kl_warmup_steps: int = _setting(
        0, "linear schedule: steps over which the KL weight ramps from 0 to 1", "N")
    kl_cycle_steps: int | None = _setting(None, "cyclical schedule: steps per cycle", "N")
    kl_cycle_ramp: float = _setting(
        0.5, "cyclical schedule: fraction of each cycle spent ramping from 0 to 1", "F")
    grad_clip: float | None = _setting(None, "clip the gradients' global L2 norm", "NORM")
    precision: str = _setting("fp32", "autocast precision (fp16 uses a gradient scaler)",
                              "{fp32,bf16,fp16}")
    eval_fraction: float = _setting(
        0.0, "hold out this fraction of the data for evaluation (chosen by --seed)", "F")
    eval_every: int | None = _setting(None, "evaluate every N steps (default: at the end)", "N")
    eval_batches: int | None = _setting(None, "evaluation batches (default: all)", "N")
    log_every: int = _setting(50, "write a metrics record every N steps", "N")
    checkpoint_every: int | None = _setting(1000, "checkpoint every N steps", "N")
    resume: bool = _setting(
        False, "continue the run in --out from its checkpoint (starts afresh if --out holds no "
               "checkpoint yet; a missing or damaged checkpoint of a run that logged past it is "
               "an error)")
    seed: int = _setting(0, "seed of model initialisation, data order and noise", "S")
    model_seed: int | None = _setting(
        None, "seed of the initial weights (pyvae train) and the sampling noise instead of "
              "--seed, which then seeds only the data order and split (default: --seed)", "S")
    num_workers: int = _setting(0, "DataLoader worker processes per process", "N")
    gather_global_batch: bool = _setting(
        False, "models with whole-batch statistics (BetaTCVAE) gather the batch of all "
               "processes")

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"fit: give exactly one of steps and epochs (got steps="
                             f"{self.steps!r}, epochs={self.epochs!r})")
        may_be_none = ("steps", "epochs", "stop_after", "eval_every", "eval_batches",
                       "kl_cycle_steps", "checkpoint_every")
        for name in may_be_none + ("batch_size", "log_every"):
            if getattr(self, name) is not None or name not in may_be_none:
                object.__setattr__(self, name, check_int("fit", name, getattr(self, name), 1))
        for name in ("lr_warmup_steps", "kl_warmup_steps", "seed", "num_workers"):
            object.__setattr__(self, name, check_int("fit", name, getattr(self, name), 0))
        if self.model_seed is not None:
            object.__setattr__(self, "model_seed", check_int("fit", "model_seed",
                                                             self.model_seed, 0))
        for name, choices in [("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("kl_schedule", KL_SCHEDULES), ("precision", AUTOCAST_DTYPES)]:
            if getattr(self, name) not in choices:
                raise ValueError(f"fit: {name} must be one of {tuple(choices)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("resume", "gather_global_batch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"fit: {name} must be a bool, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"fit: lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"fit: weight_decay must be non-negative, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"fit: betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.kl_schedule == "cyclical" and self.kl_cycle_steps is None:
            raise ValueError("fit: kl_schedule='cyclical' needs kl_cycle_steps (the cycle length)")
        if not 0.0 < self.kl_cycle_ramp <= 1.0:
            raise ValueError(f"fit: kl_cycle_ramp must be in (0, 1], got {self.kl_cycle_ramp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"fit: grad_clip must be positive or None, got {self.grad_clip!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"fit: eval_fraction must be in [0, 1), got {self.eval_fraction!r}")

    @property
    def noise_seed(self) -> int:
        """The seed of the sampling noise: ``model_seed``, else ``seed``."""
        return self.seed if self.model_seed is None else self.model_seed

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (``betas`` as a list), as ``config.json`` holds them."""
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from a dict such as ``config.json``'s ``"train"``; an unknown key is a
        ValueError naming it."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; TrainConfig has "
                             f"{sorted(cls.field_names())}")
        return cls(**values)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
