"""Parse an expert budget ("25%", "512MiB", "all", a byte count) into a number of slots."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from moeflow.errors import BudgetError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)
# No machine has an exbibyte of memory: a larger budget is a typo (or 1e309 written out), not a ceiling.
MAX_BUDGET_BYTES = 2**60


@dataclass(frozen=True, kw_only=True)
class Budget:
    budget_bytes: int  # the ceiling the user asked for
    slots: int  # experts the fast tier holds: slots * slot_bytes <= budget_bytes


def resolve_budget(spec: str | int | float, *, slot_bytes: int, total_experts: int, top_k: int) -> Budget:
    """Turn a budget spec into slots; refuse one that cannot hold a single layer's top-k."""
    total_bytes = slot_bytes * total_experts
    budget_bytes = _parse(spec, total_bytes)
    slots = min(budget_bytes // slot_bytes, total_experts)
    if slots < top_k:
        need = top_k * slot_bytes
        raise BudgetError(
            f"expert budget {spec!r} ({budget_bytes} bytes) holds {slots} expert(s), but one layer's top-{top_k} "
            f"routing needs {top_k} resident at once: the minimum is {need} bytes "
            f"({need / 2**20:.2f} MiB, {100 * need / total_bytes:.2f}% of the experts). "
            f"Raise --expert-budget to at least that."
        )
    return Budget(budget_bytes=budget_bytes, slots=int(slots))


def _parse(spec: str | int | float, total_bytes: int) -> int:
    if isinstance(spec, bool):
        raise BudgetError(f"expert budget must be a size or a percentage, not {spec!r}")
    if isinstance(spec, int):
        value = spec
    elif isinstance(spec, float):
        if not math.isfinite(spec) or not 0 < spec <= 1:
            raise BudgetError(f"a fractional expert budget must be in (0, 1], got {spec}")
        value = int(spec * total_bytes)
    else:
        text = spec.strip().lower()
        if text in ("all", "100%"):
            return total_bytes
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise BudgetError(f"cannot read expert budget {spec!r}; write e.g. 25%, 512MiB or all") from None
            if not 0 < pct <= 100:
                raise BudgetError(f"expert budget percentage must be in (0, 100], got {spec!r}")
            return int(total_bytes * pct / 100)
        m = _SIZE.match(text)
        if m is None:
            raise BudgetError(f"cannot read expert budget {spec!r}; write e.g. 25%, 512MiB, 2GB or all")
        # Exact arithmetic: a long digit string is a (too) large number, not a float overflowing to inf.
        digits = m.group(1)
        value = MAX_BUDGET_BYTES + 1 if len(digits) > 40 else int(Fraction(digits) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise BudgetError(f"expert budget must be positive, got {spec!r}")
    if value > MAX_BUDGET_BYTES:
        raise BudgetError(
            f"expert budget {_shown(spec)} is more than 1 EiB, more than any machine's memory; "
            "write e.g. 25%, 512MiB, 2GB, or all to hold every expert"
        )
    return value


def _shown(spec: str | int) -> str:
    """The spec for a message, a very long one abridged (an int beyond 4300 digits cannot even be printed)."""
    if isinstance(spec, int) and spec.bit_length() > 128:
        return f"(an integer of {spec.bit_length()} bits)"
    text = repr(spec)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"
