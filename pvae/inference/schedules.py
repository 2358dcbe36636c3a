"""beta / KL-annealing schedules: ``schedule(step) -> beta``, the weight of the KL term at an
optimizer step (step 0 is the first)."""

from __future__ import annotations

__all__ = ["Constant", "Cyclical", "LinearWarmup", "make_schedule", "settled"]


class Constant:
    """beta(step) = beta."""

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def __call__(self, step: int) -> float:
        return self.beta

    def settled(self, step: int) -> bool:
        return True

    def __repr__(self):
        return f"Constant({self.beta})"


class LinearWarmup:
    """KL annealing (Bowman et al. 2016): beta rises linearly from ``start`` to ``end`` over
    ``num_steps`` optimizer steps, then stays at ``end``."""

    def __init__(self, num_steps: int, start: float = 0.0, end: float = 1.0):
        if num_steps < 1:
            raise ValueError(f"Expected num_steps >= 1, got {num_steps}")
        self.num_steps, self.start, self.end = num_steps, float(start), float(end)

    def __call__(self, step: int) -> float:
        t = min(step / self.num_steps, 1.0)
        return self.start + t * (self.end - self.start)

    def settled(self, step: int) -> bool:
        """Warmed up: beta has reached ``end``."""
        return step >= self.num_steps

    def __repr__(self):
        return f"LinearWarmup({self.num_steps}, start={self.start}, end={self.end})"


class Cyclical:
    """Cyclical annealing (Fu et al. 2019): in every period of ``period`` steps beta rises
    linearly from 0 to ``end`` during the first ``ratio`` of the period, then stays there."""

    def __init__(self, period: int, ratio: float = 0.5, end: float = 1.0):
        if period < 1 or not 0 < ratio <= 1:
            raise ValueError(f"Expected period >= 1 and 0 < ratio <= 1, got {period}, {ratio}")
        self.period, self.ratio, self.end = period, ratio, float(end)

    def __call__(self, step: int) -> float:
        t = (step % self.period) / (self.period * self.ratio)
        return self.end * min(t, 1.0)

    def settled(self, step: int) -> bool:
        """In the flat part of a cycle, where beta is ``end``."""
        return (step % self.period) >= self.period * self.ratio

    def __repr__(self):
        return f"Cyclical({self.period}, ratio={self.ratio}, end={self.end})"


def settled(schedule, step: int) -> bool:
    """Whether beta no longer changes at ``step``: after a warm-up, in the flat part of a cycle,
    always for a constant; a schedule of the user's own (any callable) counts as settled unless
    it has a ``settled(step)`` method."""
    check = getattr(schedule, "settled", None)
    return bool(check(step)) if callable(check) else True


def make_schedule(beta=1.0, kl_warmup_steps: int = 0, kl_cycle_steps: int = 0):
    """A schedule from command-line style settings: a float or callable ``beta``; a linear
    warm-up from 0 to ``beta`` over ``kl_warmup_steps``; or cyclical annealing with period
    ``kl_cycle_steps``."""
    if callable(beta):
        return beta
    if kl_warmup_steps and kl_cycle_steps:
        raise ValueError("choose either kl_warmup_steps or kl_cycle_steps, not both")
    if kl_warmup_steps:
        return LinearWarmup(kl_warmup_steps, 0.0, beta)
    if kl_cycle_steps:
        return Cyclical(kl_cycle_steps, 0.5, beta)
    return Constant(beta)


