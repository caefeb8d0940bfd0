"""Frozen weights shared between the processes of a node through one memory-mapped file.

Every Ray actor of a simulation loads the same frozen base model (an LSR teacher, a RALT
base under its LoRA factors). Loaded normally, each actor holds a private copy: SmolLM2's
frozen weights cost ~0.33 GB per actor, so 8 actors on a node hold 2.6 GB of identical
bytes. Here the frozen tensors are written once to a safetensors file in the cache, keyed
by a digest of their bytes, and every process maps that file: the kernel keeps one copy in
its page cache and each process's share of it (PSS) shrinks with the number of mappers.
The map is private (copy-on-write), so a process that writes a frozen weight (merging
LoRA for export) gets its own pages and never changes the file or another process.

The digest covers every tensor's name, dtype, shape and bytes, so a file is only reused
for exactly the weights it holds; it is written atomically under a lock, so concurrent
actors write it once and never read a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

import torch

from fedrag_ray.atomic import atomic_write_bytes

FORMAT_VERSION = "1"


def frozen_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's frozen, dense CPU parameters by their first name (a tied weight once)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen or p.requires_grad or p.device.type != "cpu":
            continue
        seen.add(id(p))
        # bitsandbytes' quantized parameters are subclasses with their own state
        if type(p) is not torch.nn.Parameter or p.layout is not torch.strided:
            continue
        out[name] = p
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """Names, dtypes, shapes and bytes of ``tensors``: equal digests, equal weights."""
    h = hashlib.blake2b(digest_size=16)
    h.update(FORMAT_VERSION.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


def _load_mapped(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The file's tensors as maps of it, or None when it does not hold ``expected``'s
    names, dtypes and shapes (e.g. a file someone truncated: it is then rewritten)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(expected):
                return None
            out = {k: f.get_tensor(k) for k in expected}
    except Exception:  # noqa: BLE001 - unreadable means "write it again"
        return None
    for k, t in out.items():
        if t.dtype != expected[k].dtype or t.shape != expected[k].shape:
            return None
    return out


def share_frozen_weights(module: torch.nn.Module, directory: str | Path) -> Path | None:
    """Replace the frozen CPU parameters of ``module`` by maps of one file in
    ``directory`` that holds the same bytes (written on first use). Results are
    bit-identical: the values do not change, only where their memory comes from.
    Returns the file, or None when the module has no frozen CPU parameters."""
    params = frozen_parameters(module)
    if not params:
        return None
    tensors = {k: p.data for k, p in params.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest(tensors)}.safetensors"
    mapped = _load_mapped(path, tensors)  # None when missing or damaged
    if mapped is None:
        with open(directory / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another actor may be writing it right now
            mapped = _load_mapped(path, tensors)
            if mapped is None:
                _write(path, tensors)
                mapped = _load_mapped(path, tensors)
        if mapped is None:
            raise RuntimeError(f"{path}: written but unreadable")
    for name, p in params.items():
        p.data = mapped[name]
    return path
