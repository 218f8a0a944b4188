"""What pagedkv reads from a transformers model beyond its layers' kinds (:mod:`.hf_layers`): a
name for its weights, for the stores a :class:`~pagedkv.integrations.transformers.PagedCache`
shares with other models and processes, and its K/V geometry and dtype from its config."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .hf_layers import kv_geometry  # noqa: F401  (re-exported: where it lived)


def model_id(model: torch.nn.Module, *, sample: int = 64) -> str:
    """A name of a transformers model's weights, for the stores behind a :class:`PagedCache`: its
    config's ``name_or_path`` and a sha256 over every parameter's name, shape, dtype and ``sample``
    of its numbers spread over it (the first, the last and evenly between). A fine-tune or another
    checkpoint of the same architecture gets another id; the same weights loaded again, in any
    process, the same one. Reads ``sample`` numbers a tensor, never the whole model."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if flat.numel():
            at = torch.linspace(0, flat.numel() - 1, min(sample, flat.numel())).long()
            picked = flat[at].float().cpu().numpy()
            digest.update(np.ascontiguousarray(picked).tobytes())
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return f"{name}@{digest.hexdigest()[:32]}"


def config_dtype(config: Any) -> torch.dtype:
    """The model's dtype as its config says it (float32 when it does not)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def model_id_of(model: Any) -> str:
    """A PagedCache's ``model_id`` argument as a str (see :func:`model_id`)."""
    if isinstance(model, torch.nn.Module):
        return model_id(model)
    raise ConfigError("stores need a model_id: the model (PagedCache(model.config, stores=..., model_id=model)) or a "
                      f"str naming its weights, so that models of one geometry never share blocks; got {model!r}")
