"""Trainer tests on tiny synthetic data: every recipe lowers its loss, resume is exact, the exported file
loads in the service adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from training.recipes import get_recipe
from training.synthetic import generate_caption, generate_person, generate_refer
from training.trainer import StepContext, read_jsonl, seed_everything, train

torch.set_num_threads(2)

# method -> (synthetic kind = data sub-folder, steps for the falling-loss check, required loss ratio after/before)
METHODS: dict[str, tuple[str, int, float]] = {
    "irra": ("person", 12, 0.9),
    "ivt": ("person", 30, 0.98),  # CMPM from random weights leaves its plateau slowly
    "laps": ("caption", 25, 0.9),
    "scanformer": ("refer", 30, 0.95),
    "magnet": ("refer", 12, 0.9),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_person(root / "person", seed=0, size="tiny", progress=False)
    generate_caption(root / "caption", seed=0, size="tiny", progress=False)
    generate_refer(root / "refer", seed=0, size="tiny", progress=False)
    return root


def tiny_config(method: str, **overrides: Any) -> dict[str, Any]:
    config = get_recipe(method).config("tiny")
    config.update(log_every=1, **overrides)
    return config


def fixed_batch_loss(method: str, config: dict[str, Any], data: Path, state: dict[str, torch.Tensor] | None) -> float:
    """The recipe's loss on the first samples of the training set, with every random draw fixed."""
    recipe = get_recipe(method)
    config = dict(config)
    dataset = recipe.train_dataset(data, config)
    seed_everything(int(config["seed"]))
    model = recipe.build_model(config)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    seed_everything(1234)
    batch = recipe.collate([dataset[i] for i in range(int(config["batch_size"]))], config)
    seed_everything(1234)
    ctx = StepContext(epoch=1, step=0, step_in_epoch=0, steps_per_epoch=1, config=config, device=torch.device("cpu"))
    with torch.no_grad():
        losses = recipe.loss(model, batch, ctx)
    return float(sum(v for k, v in losses.items() if "loss" in k))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_lowers_the_loss(method: str, data_root: Path, tmp_path: Path) -> None:
    kind, steps, ratio = METHODS[method]
    config = tiny_config(method, epochs=100)
    data = data_root / kind
    result = train(get_recipe(method), data, tmp_path, config, max_steps=steps, progress=False)
    assert result.step == steps
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    before = fixed_batch_loss(method, state["config"], data, None)
    after = fixed_batch_loss(method, state["config"], data, state["model"])
    assert after < ratio * before, (before, after)
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_continues_exactly(method: str, data_root: Path, tmp_path: Path) -> None:
    kind = METHODS[method][0]
    data = data_root / kind
    config = tiny_config(method, epochs=100)
    straight = train(get_recipe(method), data, tmp_path / "straight", config, max_steps=4, progress=False)
    first = train(get_recipe(method), data, tmp_path / "resumed", config, max_steps=2, progress=False)
    assert first.step == 2
    resumed = train(get_recipe(method), data, tmp_path / "resumed", config, max_steps=4, resume=True,
                    progress=False)
    assert resumed.step == straight.step == 4
    a = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "step"}
    b = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "step"}
    assert sorted(b) == [1, 2, 3, 4]
    assert b[3] == a[3] and b[4] == a[4]


def _load_adapter(method: str, path: Path) -> Any:
    import importlib

    from service.registry import METHODS as SERVICE_METHODS

    module_name, class_name, task = SERVICE_METHODS[method]
    adapter = getattr(importlib.import_module(module_name), class_name)
    return adapter.from_checkpoint(str(path), device="cpu", precision="fp32"), task


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exported_checkpoint_loads_in_the_service_adapter(method: str, data_root: Path, tmp_path: Path) -> None:
    kind = METHODS[method][0]
    result = train(get_recipe(method), data_root / kind, tmp_path, tiny_config(method, epochs=1), max_steps=1,
                   progress=False)
    model, task = _load_adapter(method, result.export_path)
    image = Image.new("RGB", (48, 96), (200, 30, 30))
    if task == "search":
        assert model.encode_texts(["a person in a red shirt"]).shape[0] == 1
        assert model.encode_images([image]).shape[0] == 1
    elif task == "ground":
        assert len(model.ground(image, ["the red circle"])[0]["box_xyxy"]) == 4
    else:
        assert model.segment(image, ["the red circle"])[0].shape == (96, 48)
