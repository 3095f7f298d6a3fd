"""Learning-rate and KL-weight schedules, as functions of the 0-based index of the optimizer step
about to be taken."""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")
KL_SCHEDULES = ("linear", "cyclical")


def lr_factor(step: int, *, schedule: str = "constant", warmup_steps: int = 0,
              total_steps: int = 1) -> float:
    """The multiplier of the base learning rate at step ``step``.

    A linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``"constant"`` (1), ``"cosine"`` (half a cosine from 1 towards 0 at ``total_steps``) or
    ``"linear"`` (a straight line from 1 towards 0 at ``total_steps``).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def kl_weight(step: int, *, schedule: str = "linear", warmup_steps: int = 0,
              cycle_steps: int | None = None, cycle_ramp: float = 0.5) -> float:
    """The weight in [0, 1] of the rate term(s) at step ``step`` (``model.loss(x, kl_weight)``).

    ``"linear"``: rises linearly from 0 at step 0 to 1 at ``warmup_steps``, then stays 1
    (always 1 when ``warmup_steps == 0``). ``"cyclical"`` (Fu et al. 2019): cycles of
    ``cycle_steps`` steps, each rising linearly from 0 to 1 over its first ``cycle_ramp``
    fraction and then staying 1.
    """
    if schedule == "linear":
        return 1.0 if step >= warmup_steps else step / warmup_steps
    if schedule == "cyclical":
        if not cycle_steps or cycle_steps < 1:
            raise ValueError(f"kl_cycle_steps must be a positive int for kl_schedule='cyclical', "
                             f"got {cycle_steps!r}")
        ramp = cycle_ramp * cycle_steps
        return min(1.0, (step % cycle_steps) / ramp)
    raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")
