"""The checks a stage's config dataclass makes of its own values as it is built (in `__post_init__`), so that
a mistake stops the command before any cluster starts or any data is read. Each refusal names the flag, the
value given and what the flag takes. A field's flag is `--` and its name with dashes, unless the field's
metadata names another (`metadata={"flag": "--num-cpus"}`)."""

from __future__ import annotations

import dataclasses
import math

from audiodiff.errors import AudiodiffError


def flag(config, name: str) -> str:
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.metadata.get("flag", "--" + name.replace("_", "-"))


def finite(config) -> None:
    """Every float field finite: argparse's float() takes inf and nan, which end in tracebacks or NaN clips."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise AudiodiffError(f"{flag(config, field.name)} must be a finite number, got {value}")


def at_least(config, minimum: float, *names: str) -> None:
    """Each of the fields `names` (those not None) at least `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise AudiodiffError(f"{flag(config, name)} must be at least {minimum:g}, got {value:g}")


def positive(config, *names: str) -> None:
    """Each of the fields `names` (those not None) above 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise AudiodiffError(f"{flag(config, name)} must be more than 0, got {value:g}")


def one_of(config, name: str, choices) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise AudiodiffError(f"{flag(config, name)} must be one of {', '.join(map(str, choices))}, got '{value}'")
