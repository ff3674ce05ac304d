"""Which model serves each method: official weights named in ``weights/manifest.json``, else the demo weights
of ``weights/demo/manifest.json``, else a randomly initialised model (and ``/models`` says which)."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.batching import MicroBatcher
from service.settings import Settings

log = logging.getLogger(__name__)

# method -> (module, adapter class, task). Each adapter offers from_checkpoint(path, device=, precision=) and
# from_config(config=None, device=, precision=), and the surface of models/base.py for its task.
METHODS: dict[str, tuple[str, str, str]] = {
    "irra": ("models.irra", "IRRARetrievalModel", "search"),
    "ivt": ("models.ivt", "IVTRetrievalModel", "search"),
    "laps": ("models.laps", "LapsSearchModel", "search"),
    "scanformer": ("models.scanformer", "ScanFormerGrounder", "ground"),
    "magnet": ("models.magnet", "MagNetSegmenter", "segment"),
}


def adapter_class(method: str) -> tuple[Any, str]:
    """(the adapter class serving ``method``, its task), imported from ``METHODS``."""
    module_name, class_name, task = METHODS[method]
    return getattr(importlib.import_module(module_name), class_name), task


@dataclass
class ModelEntry:
    method: str
    task: str
    model: Any
    source: str  # "official" | "demo" | "random-init" | "injected"
    checkpoint: str | None = None
    load_seconds: float = 0.0
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(getattr(self.model, "version", "unknown"))

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "task": self.task, "source": self.source, "version": self.version,
                "checkpoint": self.checkpoint, "load_seconds": round(self.load_seconds, 2),
                "embed_dim": getattr(self.model, "embed_dim", None),
                "precision": getattr(self.model, "precision", None), "device": str(getattr(self.model, "device", ""))}


def read_manifest(weights_dir: Path) -> dict[str, dict[str, Any]]:
    """Official entries first, demo entries second: ``{method: {"file": path, "source": ...}}``."""
    found: dict[str, dict[str, Any]] = {}
    for manifest, source in ((weights_dir / "manifest.json", "official"), (weights_dir / "demo" / "manifest.json",
                                                                            "demo")):
        if not manifest.exists():
            continue
        entries = json.loads(manifest.read_text()).get("models", {})
        for method, entry in entries.items():
            path = (manifest.parent / entry["file"]).resolve()
            if method not in found and path.exists():
                found[method] = {**entry, "file": str(path), "source": entry.get("source", source)}
    return found


class ModelRegistry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        self.errors: dict[str, str] = {}
        self.ready = threading.Event()

    def register(self, method: str, model: Any, source: str = "injected", checkpoint: str | None = None) -> ModelEntry:
        task = METHODS[method][2] if method in METHODS else getattr(model, "task", "search")
        entry = ModelEntry(method, task, model, source, checkpoint)
        s = self.settings
        if task == "search":
            entry.batchers["text"] = MicroBatcher(model.encode_texts, s.max_batch_size, s.max_batch_wait_ms,
                                                  s.max_queue, f"{method}-text")
            entry.batchers["image"] = MicroBatcher(model.encode_images, s.max_batch_size, s.max_batch_wait_ms,
                                                   s.max_queue, f"{method}-image")
        self.entries[method] = entry
        self.errors.pop(method, None)
        return entry

    def load_all(self) -> None:
        """Load every configured method; a method that fails is reported in /models, not fatal."""
        manifest = read_manifest(self.settings.weights_dir)
        if self.settings.precision in ("fp32", "official"):  # as the official code ran: no TF32 in fp32 matmuls
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        for method in self.settings.method_list():
            if method in self.entries:
                continue
            if method not in METHODS:
                self.errors[method] = "unknown method"
                continue
            start = time.perf_counter()
            try:
                adapter, _ = adapter_class(method)
                device, precision = self.settings.torch_device(), self.settings.precision
                if method in manifest:
                    entry = manifest[method]
                    model = adapter.from_checkpoint(entry["file"], device=device, precision=precision)
                    registered = self.register(method, model, entry["source"], entry["file"])
                else:
                    model = adapter.from_config(None, device=device, precision=precision)
                    registered = self.register(method, model, "random-init")
                registered.load_seconds = time.perf_counter() - start
                if self.settings.warmup:
                    self.warm(registered)
            except Exception as exc:  # noqa: BLE001 - reported per method
                log.exception("loading %s failed", method)
                self.errors[method] = f"{type(exc).__name__}: {exc}"
        self.ready.set()

    @staticmethod
    def warm(entry: ModelEntry) -> None:
        from PIL import Image

        image = Image.new("RGB", (64, 128), (120, 120, 120))
        if entry.task == "search":
            entry.batchers["text"].run_sync(["a warm-up sentence"])
            entry.batchers["image"].run_sync([image])
        elif entry.task == "ground":
            entry.model.ground(image, ["a warm-up sentence"])
        elif entry.task == "segment":
            entry.model.segment(image, ["a warm-up sentence"])

    def get(self, method: str, task: str) -> ModelEntry:
        from service.errors import ApiError

        if method not in METHODS and method not in self.entries:
            raise ApiError(422, "unknown_method", f"unknown method {method!r}; known: {sorted(METHODS)}")
        entry = self.entries.get(method)
        if entry is None:
            reason = self.errors.get(method) or ("still loading" if not self.ready.is_set() else "not configured")
            raise ApiError(503, "model_unavailable", f"method {method!r} is not available: {reason}")
        if entry.task != task:
            raise ApiError(422, "wrong_task", f"method {method!r} serves {entry.task!r}, not {task!r}")
        return entry

    def close(self) -> None:
        for entry in self.entries.values():
            for batcher in entry.batchers.values():
                batcher.close()
