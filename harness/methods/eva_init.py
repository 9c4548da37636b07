"""A faster check, inside peft's EVA initialisation, for target layers that receive the same input.

Before its incremental PCA, ``peft.tuners.lora.eva`` runs one forward with a ``HashHook`` on every target
layer and groups the layers whose inputs are equal (one SVD serves a group, and its members share a
component budget). The hook keys an input by ``hash(tuple(x.view(-1).tolist()))``: a Python float per
element, for every element of every target layer's input, on the CPU even on a GPU host (the hook moves
the input there first); it made EVA's wrap an outlier of the first GPU board's costs (BENCHMARKS.md).
:func:`input_key` gives the same grouping from a digest of the values' bytes.

Equal keys mean equal values, as in peft: values are compared as float64 (which holds every float16,
bfloat16, float32 and float64 value, and integers up to 2**53, exactly), ``-0.0`` counts as ``0.0``
(Python's ``hash(-0.0) == hash(0.0)``). Inputs holding NaNs are equal when their NaNs sit at the same
places and the rest is equal; peft's hash of a NaN depends on the address of the Python float ``tolist``
made for it, so its verdict on such inputs varies from run to run. The shape is not part of the key, as it
is not in peft's.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Hashable, Iterator

import torch

# Whether EVA's initialisation uses :func:`input_key` (True) or peft's own hash (False): the switch
# ``bench methods --set eva_input_key=peft`` flips for an A/B.
FAST_INPUT_KEY: bool = True


def input_key(tensor: torch.Tensor) -> Hashable:
    """A key for ``tensor``'s values: equal for two tensors exactly when peft's ``HashHook.hash_fn`` calls
    their flattened values equal (up to a 128-bit digest's collisions)."""
    x = tensor.detach()
    if x.is_complex():
        raise TypeError("EVA's input check: complex layer inputs are not supported (peft's hash compares "
                        "Python complex numbers; this key compares real float64 values)")
    x = x.to(torch.float64) + 0.0  # -0.0 + 0.0 is +0.0 under round-to-nearest
    x = torch.where(torch.isnan(x), float("nan"), x).contiguous().cpu()  # one NaN bit pattern
    return hashlib.blake2b(memoryview(x.view(-1).numpy()).cast("B"), digest_size=16).digest()


@contextlib.contextmanager
def fast_input_keys(enabled: bool | None = None) -> Iterator[bool]:
    """While inside, peft's EVA ``HashHook`` keys layer inputs with :func:`input_key` (``enabled`` None:
    :data:`FAST_INPUT_KEY` decides). Yields whether it does: False also where peft has no ``HashHook.hash_fn``
    to replace (another peft version), so peft's own check runs unchanged."""
    use = FAST_INPUT_KEY if enabled is None else enabled
    from peft.tuners.lora import eva

    hook = getattr(eva, "HashHook", None)
    original = hook.__dict__.get("hash_fn") if hook is not None else None
    if not use or original is None:
        yield False
        return
    hook.hash_fn = staticmethod(input_key)
    try:
        yield True
    finally:
        hook.hash_fn = original


__all__ = ["FAST_INPUT_KEY", "fast_input_keys", "input_key"]
