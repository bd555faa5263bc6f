"""The one helper of the bad-input tests (tests/test_bad_input_*.py: the functions, the layers,
the registered ops), and the valid arguments their cases start from.

Each bad call must raise the exception type stock PyTorch raises for it (RuntimeError) or
ValueError / TypeError, with a message naming the argument and what was expected; none may
crash the process (a crash fails the whole run, which is the point).

A case is a row (id, arg, exception type, regex the message must match) of a surface's table;
cases() makes a table's rows pytest params, one per row and combination of the surface's other
axes (backend, function, layer class): `setup(arg, *axis values)` builds the arguments and
returns the bad call, which check() makes under pytest.raises.
"""

import functools
import itertools

import pytest

# Valid arguments each case starts from: conv input (N, C, H, W) = (2, 3, 10, 10), weight
# (O, C, K, K) = (4, 3, 3, 3) -> conv output 8x8 -> pooled 4x4; linear input (4, IN), weight
# (OUT, IN).
N, C, H, W, O, K = 2, 3, 10, 10, 4, 3
IN, OUT = 6, 5


# An unavailable or unknown backend: (id, backend, exception type, regex).
# fmt: off
BACKEND_CASES = [
    ("cuda", "cuda", RuntimeError, r"backend 'cuda' is unavailable: "),
    ("tpu", "tpu", ValueError,
     r"backend must be one of \('auto', 'cpu', 'cuda', 'triton', 'reference'\)"),
    ("CPU", "CPU", ValueError, r"backend must be one of .*, got 'CPU'"),
    ("None", None, ValueError, r"backend must be one of .*, got None"),
    ("0", 0, ValueError, r"backend must be one of .*, got 0"),
]
# fmt: on


def changed(valid, **changes):
    """A builder of the arguments `valid()` returns (a dict), with `changes`: values, or
    functions of the valid value."""

    def build():
        args = valid()
        for key, value in changes.items():
            args[key] = value(args[key]) if callable(value) else value
        return args

    return build


def _id(value):
    return getattr(value, "__name__", str(value))


def cases(surface, table, setup, *axes, marks=()):
    """pytest params (make, exc, match): one per row (id, arg, exc, match) of `table` and each
    combination of one value of each of `axes`, with make = setup(arg, *values)."""
    params = []
    for values in itertools.product(*axes):
        for case_id, arg, exc, match in table:
            make = functools.partial(setup, arg, *values)
            case = "-".join([surface, case_id, *map(_id, values)])
            params.append(pytest.param(make, exc, match, id=case, marks=marks))
    return params


def check(make, exc, match):
    """Builds a case's arguments, then its call must raise `exc` with a message `match`es."""
    call = make()
    with pytest.raises(exc, match=match):
        call()
