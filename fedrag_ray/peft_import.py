"""Import peft without bitsandbytes unless a model is quantized.

peft imports bitsandbytes whenever the package is installed: eagerly in ``peft.helpers``
and again when it injects LoRA (its bnb-layer dispatch). bitsandbytes in turn imports
torch's inductor stack: ~45 MiB resident and ~1 s per process, paid by every Ray actor of a
federation although nothing is quantized. ``import_peft(quantized=False)`` hides the package
while peft is first imported, so peft records it as unavailable. A quantized model later in
the same process calls ``import_peft(quantized=True)``, which imports bitsandbytes and makes
peft look again, so LoRA dispatches onto 4-/8-bit layers as before. The two peft internals
this needs are reached through ``fedrag_ray.compat``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from fedrag_ray import compat

_BNB = "bitsandbytes"


def import_peft(quantized: bool = False) -> ModuleType:
    """The ``peft`` module; bitsandbytes is imported only when ``quantized``."""
    if quantized:
        import bitsandbytes

        compat.make_peft_see_bitsandbytes(bitsandbytes)
        return importlib.import_module("peft")
    if "peft" in sys.modules or _BNB in sys.modules:
        return importlib.import_module("peft")  # already decided in this process
    sys.modules[_BNB] = None  # type: ignore[assignment]  # import -> ImportError, find_spec -> None
    try:
        peft = importlib.import_module("peft")
        compat.cache_peft_bitsandbytes_unavailable()  # for peft's LoRA dispatch
    finally:
        if _BNB in sys.modules and sys.modules[_BNB] is None:
            del sys.modules[_BNB]
    return peft
