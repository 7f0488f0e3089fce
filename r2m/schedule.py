"""The time-step weight w(t) of paper Eq. 4."""

from __future__ import annotations

import math


def omega(step: int, total_steps: int, omega_min: float) -> float:
    """w(t) = max(0.5 cos(pi t / T) + 0.5, Omega): 1 at the first step (pure RM semantics), decaying to the floor.

    Steps past ``total_steps`` stay at the value for ``total_steps``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"omega: total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"omega: step must be an int >= 0, got {step!r}")
    if not 0.0 <= omega_min <= 1.0:
        raise ValueError(f"omega: omega_min must be in [0, 1], got {omega_min!r}")
    t = min(step, total_steps)
    return max(0.5 * math.cos(math.pi * t / total_steps) + 0.5, float(omega_min))
