"""Loading an optimizer's saved state exactly: every state tensor in the dtype it was saved in.

`torch.optim.Optimizer.load_state_dict` casts each floating-point state tensor to its
parameter's dtype. That is harmless when an optimizer keeps its state in the weights' dtype and
breaks exact resume whenever it does not:

* fp32 moments beside bf16 weights (`weight_dtype: bf16`): the cast rounds the moments to bf16;
* Prodigy + schedule-free keeps its `p0` and `s` in bf16 beside fp32 weights: after the cast,
  its in-place bf16 updates of `s` become fp32 ones, the adapted step size d drifts, and the
  resumed run leaves the straight one within a few steps.

`load_optimizer_state` lets torch load (it maps saved indices to parameters and moves tensors to
their device) and then puts back, for each entry whose dtype changed, the saved tensor itself on
the device torch chose. Entries torch kept in their dtype are left as torch loaded them.
"""

from __future__ import annotations

from itertools import chain

import torch


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict(saved)`, with the saved dtype of every state tensor kept."""
    optimizer.load_state_dict(saved)
    by_index = dict(
        zip(
            chain.from_iterable(g["params"] for g in saved["param_groups"]),
            chain.from_iterable(g["params"] for g in optimizer.param_groups),
            strict=True,
        )
    )
    for index, entry in saved["state"].items():
        state = optimizer.state[by_index[index]]
        for key, value in entry.items():
            loaded = state.get(key)
            if torch.is_tensor(value) and torch.is_tensor(loaded) and loaded.dtype != value.dtype:
                state[key] = value.to(device=loaded.device)
