"""The ``overrides`` of ``convert_batch_norm``: which names a drop-in accepts, checked at
conversion with the core's checks (no framework import, so every adapter can use it)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ._checks import (
    check_epsilon,
    check_flag,
    check_momentum,
    check_renorm_clipping,
    check_virtual_batch_size,
)

__all__ = ["check_overrides"]


def check_overrides(
    overrides: Mapping[str, Any], settable: Collection[str], fixed: Mapping[str, str], layer: str
) -> None:
    """Each of ``overrides`` names a settable field of ``layer`` and has a valid value.

    Args:
      overrides: the keyword arguments given to ``convert_batch_norm``.
      settable: the fields of ``layer`` that conversion may set.
      fixed: fields of ``layer`` that conversion takes from the model, each with the reason.
      layer: the drop-in's name, for the messages.

    Raises:
      TypeError: a name that is not in ``settable`` (with the reason when it is in
        ``fixed``), or a flag that is not a bool, or a ``virtual_batch_size`` that is not an
        int.
      ValueError: ``momentum``, ``epsilon``, ``virtual_batch_size``, ``r_max`` or ``d_max``
        out of range.
    """
    expected = ", ".join(sorted(settable))
    for name in overrides:
        if name in fixed:
            raise TypeError(
                f"convert_batch_norm cannot override `{name}`: {fixed[name]}. The fields it can "
                f"set on {layer} are {expected}."
            )
        if name not in settable:
            raise TypeError(
                f"convert_batch_norm got `{name}`={overrides[name]!r}, which is not a field of "
                f"{layer}: expected one of {expected}."
            )
    if "momentum" in overrides:
        check_momentum(overrides["momentum"])
    if "epsilon" in overrides:
        check_epsilon(overrides["epsilon"])
    if "virtual_batch_size" in overrides:
        check_virtual_batch_size(overrides["virtual_batch_size"])
    if "r_max" in overrides or "d_max" in overrides:
        check_renorm_clipping(overrides.get("r_max", 1.0), overrides.get("d_max", 0.0))
    for name in ("debias", "unbiased_running_var", "use_renorm", "use_fast_variance"):
        if name in overrides:
            check_flag(name, overrides[name])
