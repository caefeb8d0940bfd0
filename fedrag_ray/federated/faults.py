"""The chaos knob: ``FEDRAG_RAY_FAULTS``, a comma-separated list of client faults.

==================  =====================================================================
``raise:P``          partition P raises in every round (the reply is an error)
``kill:P@R``         the actor serving partition P exits hard in round R (default 1)
``nan:P``            P's reply carries NaN in its first array
``shape:P``          P's reply has one array with a row missing
``scale:P×F``        P's update (reply minus what it received) is multiplied by F
                     (``x`` or ``*`` work too)
``signflip:P``       P's update is negated (with ``scale:P×F`` as well: ``-F`` times)
==================  =====================================================================

Used by the tests and the robustness benchmark, and handy to check that a deployment's
validation and robust aggregation hold. A malformed entry is an error, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

ENV_VAR = "FEDRAG_RAY_FAULTS"
_ITEM = re.compile(
    r"^(raise|kill|nan|shape|scale|signflip):(\d+)(?:@(\d+))?(?:[×x*]([-+0-9.eE]+))?$"
)


@dataclass
class Faults:
    raise_on: set[int] = field(default_factory=set)
    kill_on: dict[int, int] = field(default_factory=dict)
    nan: set[int] = field(default_factory=set)
    shape: set[int] = field(default_factory=set)
    scale: dict[int, float] = field(default_factory=dict)
    signflip: set[int] = field(default_factory=set)

    def corrupt(
        self, pid: int, trained: dict[str, np.ndarray], received: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The arrays partition ``pid`` sends back, with its configured faults applied."""
        if pid not in self.nan | self.shape | self.signflip | set(self.scale):
            return trained
        factor = self.scale.get(pid, 1.0) * (-1.0 if pid in self.signflip else 1.0)
        out = {
            k: (received[k] + factor * (v - received[k])).astype(v.dtype)
            if k in received and received[k].shape == v.shape
            else v.copy()
            for k, v in trained.items()
        }
        first = next(iter(out), None)
        if first is not None and pid in self.nan:
            flat = out[first].reshape(-1)
            flat[:: max(1, flat.size // 8)] = np.nan
        if first is not None and pid in self.shape:
            name = next((k for k, v in out.items() if v.ndim >= 1 and v.shape[0] > 1), first)
            out[name] = out[name][:-1]
        return out


def parse_faults(spec: str) -> Faults:
    faults = Faults()
    for raw in filter(None, (s.strip() for s in spec.split(","))):
        m = _ITEM.match(raw)
        if m is None:
            raise ValueError(
                f"{ENV_VAR}: cannot parse {raw!r}; expected raise:P, kill:P@R, nan:P, "
                "shape:P, scale:P×F or signflip:P"
            )
        kind, part, rnd, factor = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if (rnd is not None and kind != "kill") or (factor is not None) != (kind == "scale"):
            raise ValueError(f"{ENV_VAR}: {raw!r}: '@R' is for kill, '×F' for scale only")
        if kind == "raise":
            faults.raise_on.add(part)
        elif kind == "kill":
            faults.kill_on[part] = int(rnd or 1)
        elif kind == "nan":
            faults.nan.add(part)
        elif kind == "shape":
            faults.shape.add(part)
        elif kind == "scale":
            faults.scale[part] = float(factor)
        else:
            faults.signflip.add(part)
    return faults
