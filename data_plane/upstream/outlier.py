"""Passive outlier ejection: consecutive connect failures or 5xx answers from one endpoint eject it for a
while (the base ejection time, times the number of ejections so far, capped), after which it returns on its
own and gets traffic again. Per worker: each worker judges the endpoint by the requests it sent."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CONSECUTIVE_ERRORS = 5
DEFAULT_BASE_EJECTION_SECONDS = 30.0
MAX_EJECTION_MULTIPLIER = 10  # a flapping endpoint stays out for at most 10 times the base time


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_errors: int = DEFAULT_CONSECUTIVE_ERRORS
    base_ejection_seconds: float = DEFAULT_BASE_EJECTION_SECONDS


@dataclass(slots=True)
class OutlierState:
    consecutive_errors: int = 0
    ejected_until: float = 0.0
    times_ejected: int = 0
    ejections_total: int = 0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def success(self, now: float) -> None:
        self.consecutive_errors = 0
        if self.times_ejected and not self.ejected(now):
            self.times_ejected -= 1  # a good answer after returning earns back part of the backoff

    def failure(self, now: float, policy: OutlierPolicy) -> bool:
        """One more connect failure or 5xx; True when this one ejects the endpoint."""
        if self.ejected(now):
            return False  # requests already on their way when it was ejected
        self.consecutive_errors += 1
        if self.consecutive_errors < policy.consecutive_errors:
            return False
        self.consecutive_errors = 0
        self.times_ejected += 1
        self.ejections_total += 1
        self.ejected_until = now + policy.base_ejection_seconds * min(self.times_ejected, MAX_EJECTION_MULTIPLIER)
        return True
