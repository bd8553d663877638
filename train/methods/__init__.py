"""Method registry: name -> Method class. New methods register here and train through the same engine."""
from expertfuse.errors import UserError
from train.methods.base import Method
from train.methods.ce import CrossEntropy
from train.methods.ecl import ECL
from train.methods.ncl import NCL
from train.methods.shike import SHIKE
from train.methods.ssd import SSD

METHODS: dict[str, type[Method]] = {m.name: m for m in (CrossEntropy, NCL, SHIKE, ECL, SSD)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
