"""Argument checks shared by the layers' constructors.

Private module: each check coerces one constructor argument (a number, a
bool, a momentum in [0, 1)) or raises a TypeError / ValueError that names
the argument and ends "Received: arg=value", as Keras's messages do. The
feature-axis check lives with the axes (`_axes.canonicalize_axes`).
"""

import numpy as np


def check_number(name, value, accepted):
    """`value` as a float, or a TypeError naming `name` and the `accepted`
    values (a phrase such as "in [0, 1)") when it is not a number. Strings
    and bools are not numbers here, though `float()` would take them."""
    if not isinstance(value, (str, bytes, bool)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(
        f"Argument `{name}` must be a number {accepted}. "
        f"Received: {name}={value!r}"
    )


def check_positive(name, value):
    """Coerces `value` to float and checks that it is positive and finite
    (an epsilon)."""
    number = check_number(name, value, "> 0")
    if not 0.0 < number < float("inf"):
        raise ValueError(
            f"Argument `{name}` must be positive and finite. Received: "
            f"{name}={value}"
        )
    return number


def check_bool(name, value):
    """`value` if it is True or False (a NumPy bool too), else a
    TypeError naming `name`: `bool()` would take `"no"` for True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Argument `{name}` must be True or False. "
            f"Received: {name}={value!r}"
        )
    return bool(value)


def check_unit_interval(name, value):
    """Coerces `value` to float and checks that it lies in [0, 1)."""
    value = check_number(name, value, "in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1). Received: {name}={value}"
        )
    return value


def check_choice(name, value, choices):
    """`value` if it is one of the strings `choices`, else a ValueError
    (TypeError for a non-string) naming `name` and the accepted values."""
    accepted = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(
            f"Argument `{name}` must be one of {accepted}. "
            f"Received: {name}={value!r}"
        )
    if value not in choices:
        raise ValueError(
            f"Argument `{name}` must be one of {accepted}. "
            f"Received: {name}={value!r}"
        )
    return value
