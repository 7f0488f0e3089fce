"""Argument checks shared by the whole package: one wording for every bad-input error of the same kind."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None, hint: str = "",
              optional: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) in [minimum, maximum].

    ``hint`` follows the bound in the message (e.g. ``" (responses per prompt)"``); ``optional``: None passes.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        none = "None or " if optional else ""
        raise ValueError(f"{name} must be {none}an int {bound}{hint}, got {value!r}")


__all__ = ["check_int"]
