"""Without official weights the service serves the demo weights of weights/demo (and says so); without
either it falls back to random initialisation; official entries win over demo ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from service.registry import ModelRegistry, read_manifest
from service.settings import Settings

WEIGHTS = Path(__file__).parent.parent / "weights"


def test_demo_weights_are_served_and_labelled(tmp_path: Path) -> None:
    manifest = json.loads((WEIGHTS / "demo" / "manifest.json").read_text())["models"]
    assert set(manifest) == {"irra", "ivt", "laps", "scanformer", "magnet"}
    assert sum((WEIGHTS / "demo" / m["file"]).stat().st_size for m in manifest.values()) <= 20 * 1024 * 1024
    registry = ModelRegistry(Settings(weights_dir=WEIGHTS, data_dir=tmp_path, warmup=False))
    registry.load_all()
    assert registry.errors == {}
    assert {m: e.source for m, e in registry.entries.items()} == {m: "demo" for m in manifest}
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    assert registry.entries["irra"].model.encode_texts(["a man"]).shape[0] == 1
    assert len(registry.entries["scanformer"].model.ground(image, ["the red thing"])) == 1
    assert registry.entries["magnet"].model.segment(image, ["the red thing"])[0].shape == (64, 96)
    registry.close()


def test_official_manifest_wins_and_missing_files_fall_through(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS / "demo", weights / "demo")
    (weights / "official").mkdir()
    shutil.copy(weights / "demo" / "ivt.pth", weights / "official" / "ivt_best.pth")
    (weights / "manifest.json").write_text(json.dumps({"models": {
        "ivt": {"file": "official/ivt_best.pth"}, "irra": {"file": "official/not-downloaded.pth"}}}))
    found = read_manifest(weights)
    assert found["ivt"]["source"] == "official" and found["ivt"]["file"].endswith("ivt_best.pth")
    assert found["irra"]["source"] == "demo"  # the official file is absent: demo weights serve
    registry = ModelRegistry(Settings(weights_dir=tmp_path / "none", data_dir=tmp_path, methods="ivt", warmup=False))
    registry.load_all()
    assert registry.entries["ivt"].source == "random-init"
    registry.close()
