"""Loading official checkpoint files safely and strictly.

Every file goes through ``torch.load(weights_only=True)``. The few non-tensor objects that official files
hold (LAPS stores its argparse ``Namespace``; IVT stores a numpy scalar) are allowed by name, never by
turning the safe unpickler off.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model: names missing, unexpected, or with other shapes."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], source: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        where = f" {source}" if source else ""
        super().__init__(f"checkpoint{where} does not fit the model - " + "; ".join(parts))


def _numpy_safe_globals() -> list[Any]:
    """numpy objects that appear in official files (a scalar such as ``best_acc``) and rebuild them."""
    allowed: list[Any] = [np.dtype, np.ndarray]
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved the module; pickles name either
    allowed.append(core.multiarray.scalar)
    allowed.append(core.multiarray._reconstruct)
    for name in ("float64", "float32", "float16", "int64", "int32", "bool_"):
        scalar_type = getattr(np, name)
        allowed.append(scalar_type)
        allowed.append(type(np.dtype(scalar_type)))
    return allowed


SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_safe_globals()]


def load_checkpoint_file(path: str | Path, extra_safe_globals: Iterable[Any] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` and an explicit allow-list; legacy (non-zip) files work too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    allowed = [*SAFE_GLOBALS, *extra_safe_globals]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read {path.name} as a safe torch checkpoint: {exc}") from exc


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop ``prefix`` (DataParallel's ``module.``) when every key carries it; otherwise return as is."""
    keys = list(state_dict)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def find_state_dict(obj: Any, candidates: Iterable[str] = ("model", "state_dict")) -> dict[str, torch.Tensor]:
    """The tensor mapping inside an official file: ``obj[name]`` for the first candidate present, or ``obj``."""
    if isinstance(obj, Mapping):
        for name in candidates:
            if name in obj and isinstance(obj[name], Mapping):
                return dict(obj[name])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(f"no state dict found (looked for {list(candidates)} or a flat tensor mapping)")


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """``load_state_dict(strict=True)`` that first reports every missing/unexpected/mis-shaped key at once."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    module.load_state_dict(state_dict, strict=True)


def file_version(path: str | Path, length: int = 12) -> str:
    """A short content hash used to stamp answers with the exact weights that produced them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
