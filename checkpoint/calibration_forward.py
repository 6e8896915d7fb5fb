"""The calibration forward: the float source model run on calibration tokens, with a callback
on the input of chosen modules.

Both quantizers (:mod:`.convert`, the CLI job, and :mod:`.quantize_model`, the lower-level API)
collect their calibration statistics through :func:`observe_module_inputs`; they differ only in
what they keep of each input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["observe_module_inputs"]


def observe_module_inputs(src_dir: str | os.PathLike, token_ids: Sequence[Sequence[int]],
                          select: Callable[[str, object], bool],
                          observe: Callable[[str, np.ndarray], None]) -> set[str]:
    """Load the Hugging Face model in ``src_dir`` in float32, run it (no grad) on each token
    sequence, and hand the first positional input of every module for which
    ``select(name, module)`` holds to ``observe(name, x)`` as a float32 ``[tokens, features]``
    NumPy array (a copy). Returns the names of the modules that ran at least once. Hooks are
    removed even when the forward fails.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(os.fspath(src_dir), dtype=torch.float32)
    model.eval()
    seen: set[str] = set()
    hooks = []
    for name, module in model.named_modules():
        if not select(name, module):
            continue

        def hook(mod, args, name=name):
            x = args[0].detach().to(torch.float32)
            seen.add(name)
            observe(name, x.reshape(-1, x.shape[-1]).numpy().copy())

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in token_ids:
                model(torch.tensor([list(ids)], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return seen
