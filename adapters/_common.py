"""What the framework adapters share: batches of ``(inputs, targets)``.

The activation statistics they gather are the engine's
(``sparsecore.activations``): the adapters run the model and convert tensors.
"""

from __future__ import annotations


def batches(data, max_batches):
    """``(inputs, targets)`` of each batch of ``data``, at most ``max_batches``."""
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("data must yield (inputs, targets) batches")
        yield batch[0], batch[1]
