"""The time-step weight w(t) of paper Eq. 4."""

from __future__ import annotations

import math

from r2m.checks import check_int


def omega(step: int, total_steps: int, omega_min: float) -> float:
    """w(t) = max(0.5 cos(pi t / T) + 0.5, Omega): 1 at the first step (pure RM semantics), decaying to the floor.

    Steps past ``total_steps`` stay at the value for ``total_steps``.
    """
    check_int("omega: total_steps", total_steps)
    check_int("omega: step", step, minimum=0)
    if not 0.0 <= omega_min <= 1.0:
        raise ValueError(f"omega: omega_min must be in [0, 1], got {omega_min!r}")
    t = min(step, total_steps)
    return max(0.5 * math.cos(math.pi * t / total_steps) + 0.5, float(omega_min))
