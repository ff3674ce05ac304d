"""Trainer tests on tiny synthetic data: every recipe lowers its loss, resume is exact, the exported file
loads in the service adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from training.gpu_check import TINY_STEPS, fixed_batch_loss
from training.recipes import get_recipe
from training.synthetic import generate_caption, generate_person, generate_refer
from training.trainer import StepContext, read_jsonl, seed_everything, train

torch.set_num_threads(2)

# method -> (synthetic kind = data sub-folder, steps for the falling-loss check, required loss ratio after/before)
METHODS: dict[str, tuple[str, int, float]] = {
    "irra": ("person", TINY_STEPS["irra"], 0.9),
    "ivt": ("person", TINY_STEPS["ivt"], 0.98),
    "laps": ("caption", TINY_STEPS["laps"], 0.95),
    "scanformer": ("refer", TINY_STEPS["scanformer"], 0.95),
    "magnet": ("refer", TINY_STEPS["magnet"], 0.9),
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


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_lowers_the_loss(method: str, data_root: Path, tmp_path: Path) -> None:
    kind, steps, ratio = METHODS[method]
    config = tiny_config(method, epochs=100)
    data = data_root / kind
    result = train(get_recipe(method), data, tmp_path, config, max_steps=steps, progress=False)
    assert result.step == steps
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    before = fixed_batch_loss(method, state["config"], data, None, torch.device("cpu"))
    after = fixed_batch_loss(method, state["config"], data, state["model"], torch.device("cpu"))
    assert after < ratio * before, (before, after)
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))


def _load_adapter(method: str, path: Path) -> Any:
    from service.registry import adapter_class

    adapter, task = adapter_class(method)
    return adapter.from_checkpoint(str(path), device="cpu", precision="fp32"), task


def _adapter_module(model: Any) -> torch.nn.Module:
    return model.model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_continues_exactly_and_the_export_loads_in_the_service(method: str, data_root: Path,
                                                                      tmp_path: Path) -> None:
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
    again = train(get_recipe(method), data, tmp_path / "resumed", config, max_steps=4, resume=True, progress=False)
    assert again.step == 4  # resuming at the step limit trains nothing

    # the exported file loads through the service adapter, with the trained weights (fp16-rounded)
    model, task = _load_adapter(method, resumed.export_path)
    trained = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["model"]
    served = _adapter_module(model).state_dict()
    prefix = "magnet." if method == "magnet" else ""
    compared = 0
    for name, value in served.items():
        if not value.is_floating_point() or prefix + name not in trained:
            continue
        assert torch.allclose(value.float(), trained[prefix + name].float(), rtol=1e-3, atol=1e-3), name
        compared += 1
    assert compared > 10
    image = Image.new("RGB", (48, 96), (200, 30, 30))
    if task == "search":
        assert model.encode_texts(["a person in a red shirt"]).shape[0] == 1
        assert model.encode_images([image]).shape[0] == 1
    elif task == "ground":
        assert len(model.ground(image, ["the red circle"])[0]["box_xyxy"]) == 4
    else:
        assert model.segment(image, ["the red circle"])[0].shape == (96, 48)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_decoded_image_cache_leaves_training_unchanged(method: str, data_root: Path, tmp_path: Path) -> None:
    """The demo presets hold decoded images (and tokenised texts) in memory; the weights must come out the
    same bit for bit as when every image is read from disk (and, for ScanFormer, resized every time). Three
    steps, so later steps read cached images."""
    data = data_root / METHODS[method][0]
    states = []
    for cache_mb in (0, 64):
        config = tiny_config(method, epochs=100, image_cache_mb=cache_mb)
        if method == "scanformer":
            config["resized_cache_mb"] = cache_mb
        train(get_recipe(method), data, tmp_path / str(cache_mb), config, max_steps=3, progress=False)
        states.append(torch.load(tmp_path / str(cache_mb) / "last.pth", weights_only=True)["model"])
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_multi_tensor_optimiser_updates_leave_training_unchanged(method: str, data_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer switches every optimiser to PyTorch's multi-tensor (``foreach``) updates, which the CPU does
    not use by default; the weights and optimiser state must come out bit for bit as with the per-parameter loop."""
    import training.trainer

    data = data_root / METHODS[method][0]
    runs = []
    for name, switch in (("loop", lambda optimizer: None), ("foreach", training.trainer.use_foreach_updates)):
        monkeypatch.setattr(training.trainer, "use_foreach_updates", switch)
        train(get_recipe(method), data, tmp_path / name, tiny_config(method, epochs=100), max_steps=3, progress=False)
        runs.append(torch.load(tmp_path / name / "last.pth", weights_only=True))
    assert {g["foreach"] for g in runs[1]["optimizer"]["param_groups"]} == {True}
    assert {g["foreach"] for g in runs[0]["optimizer"]["param_groups"]} == {None}
    for name, value in runs[0]["model"].items():
        assert torch.equal(value, runs[1]["model"][name]), name
    for index, state in runs[0]["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, runs[1]["optimizer"]["state"][index][key]), (index, key)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_only_the_used_vocabulary_rows_gives_the_same_model(method: str, data_root: Path,
                                                                      tmp_path: Path) -> None:
    """``train(vocabulary_rows=...)`` (what ``training.demo`` does) trains only the word-table rows the texts
    use: every other tensor and those rows come out bit for bit as with the whole table, the checkpoint keeps
    the whole table under its usual name, and resuming continues exactly."""
    from training.demo import METHOD_DATA, synthetic_texts

    recipe = get_recipe(method)
    kind = METHOD_DATA[method]
    config = tiny_config(method, epochs=100)
    texts = synthetic_texts(data_root / kind, kind)
    if method == "irra":  # MLM's random replacements reach every row: no subset (the demo preset has no MLM)
        assert recipe.vocabulary_rows(texts, config) is None
        config["model"]["loss_names"] = recipe.config("demo")["model"]["loss_names"]
    if method == "laps":  # the caption corruption draws random tokens (the demo preset has none)
        assert recipe.vocabulary_rows(texts, {**config, "size_augment": True}) is None
        config["size_augment"] = False
    rows = recipe.vocabulary_rows(texts, config)
    assert rows is not None
    train(recipe, data_root / kind, tmp_path / "whole", config, max_steps=3, progress=False)
    train(recipe, data_root / kind, tmp_path / "rows", config, max_steps=2, progress=False, vocabulary_rows=rows)
    train(recipe, data_root / kind, tmp_path / "rows", config, max_steps=3, progress=False, vocabulary_rows=rows,
          resume=True)
    whole, used = (torch.load(tmp_path / name / "last.pth", weights_only=True) for name in ("whole", "rows"))
    assert whole["model"].keys() == used["model"].keys()
    table = next(k for k in whole["model"] if k.endswith(recipe.word_embedding_key))
    assert whole["model"][table].shape == used["model"][table].shape
    for name, value in whole["model"].items():
        if name != table:
            assert torch.equal(value, used["model"][name]), name
    keep = sorted(rows)
    assert torch.equal(whole["model"][table][keep], used["model"][table][keep])
    # the optimiser holds the used rows instead of the table (MagNet's Mask Grounding head has V rows too)
    def state_shapes(run: dict[str, Any]) -> list[tuple[int, ...]]:
        return sorted(tuple(t.shape) for s in run["optimizer"]["state"].values() for t in s.values() if t.dim() == 2)

    whole_shapes, used_shapes = state_shapes(whole), state_shapes(used)
    table_shape, rows_shape = tuple(whole["model"][table].shape), (len(keep), whole["model"][table].shape[1])
    moved = whole_shapes.count(table_shape) - used_shapes.count(table_shape)
    assert moved > 0 and used_shapes.count(rows_shape) - whole_shapes.count(rows_shape) == moved


@pytest.mark.parametrize("method", ["ivt", "magnet"])
def test_demo_run_method_trains_compacts_and_evaluates(method: str, data_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``training.demo.run_method`` end to end on the tiny data with the tiny preset standing in for the demo
    one: it trains only the used vocabulary rows, writes the compacted file and its manifest entry."""
    import training.demo as demo

    recipe = get_recipe(method)
    monkeypatch.setitem(recipe.configs, "demo", {**recipe.configs["tiny"], "log_every": 1})
    name, entry, metrics = demo.run_method(method, data_root, tmp_path / "work", tmp_path, threads=1, time_scale=1.0)
    assert name == method and (tmp_path / f"{method}.pth").exists()
    assert entry["train"]["steps"] > 0 and entry["metric"] in metrics
    kept, rows = entry["vocabulary_rows_kept"]
    assert 10 < kept < rows
    # the training run held the used rows only: its optimiser state has no whole-table tensor
    state = torch.load(tmp_path / "work" / method / "last.pth", weights_only=True)
    table = next(v for k, v in state["model"].items() if k.endswith(recipe.word_embedding_key))
    shapes = [tuple(t.shape) for s in state["optimizer"]["state"].values() for t in s.values() if t.dim() == 2]
    whole = shapes.count(tuple(table.shape))
    grounding_head = 2 if method == "magnet" else 0  # Mask Grounding's vocabulary classifier (Adam: 2 moments)
    assert whole == grounding_head


def test_demo_run_method_says_when_a_method_stopped_at_its_time_cap(data_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine too slow for the caps, the manifest entry and a warning say so, with a --time-scale that
    would let the method finish; a run that finishes says nothing."""
    import training.demo as demo

    recipe = get_recipe("ivt")
    monkeypatch.setitem(recipe.configs, "demo", {**recipe.configs["tiny"], "epochs": 2})
    _, finished, _ = demo.run_method("ivt", data_root, tmp_path / "work", tmp_path, threads=1, time_scale=1.0)
    assert not finished["train"]["stopped_at_time_cap"] and "WARNING" not in capsys.readouterr().err
    _, capped, _ = demo.run_method("ivt", data_root, tmp_path / "work", tmp_path, threads=1, time_scale=1e-6)
    assert capped["train"]["stopped_at_time_cap"] and capped["train"]["epochs"] == 0
    assert "ivt stopped at its time cap (0 s) after 0 of 2 epochs" in capsys.readouterr().err
    assert "--time-scale 2.5 or more" in demo.time_cap_warning("ivt", 150.0, epochs=3, planned_epochs=5, time_scale=1.5)
    assert "--time-scale 2 or more" in demo.time_cap_warning("ivt", 100.0, epochs=3, planned_epochs=5, time_scale=1.0)


def test_trained_rows_embedding_refuses_ids_outside_its_rows() -> None:
    from training.trainer import TrainedRowsEmbedding

    full = torch.nn.Embedding(50, 4, padding_idx=0)
    embedding = TrainedRowsEmbedding(full, [3, 7, 9])
    ids = torch.tensor([[3, 9, 0, 0]])
    assert torch.equal(embedding(ids), full(ids))
    assert sorted(embedding.rows.tolist()) == [0, 3, 7, 9]  # the padding row comes along
    with pytest.raises(ValueError, match=r"\[5\]"):
        embedding(torch.tensor([[3, 5]]))
    state = embedding.state_dict()
    assert list(state) == ["weight"] and state["weight"].shape == (50, 4)
    other = torch.randn(50, 4)
    embedding.load_state_dict({"weight": other})
    assert torch.equal(embedding(ids), torch.nn.functional.embedding(ids, other, 0))
    with pytest.raises(RuntimeError, match="size mismatch"):
        embedding.load_state_dict({"weight": torch.zeros(49, 4)})


# ---------------------------------------------------------------------------------------- official defaults


def test_irra_schedule_matches_the_official_table() -> None:
    """LRSchedulerWithWarmup (cosine, 5 warm-up epochs from 0.1, 60 epochs), research notes table."""
    recipe = get_recipe("irra")
    factor = recipe.lr_multiplier(recipe.config("official"), steps_per_epoch=1)
    expected = {1: 0.10, 2: 0.28, 3: 0.46, 5: 0.82, 6: 1.0, 20: 0.848, 30: 0.599, 40: 0.319, 50: 0.095, 60: 0.0008}
    for epoch, value in expected.items():
        assert factor(epoch - 1) == pytest.approx(value, abs=6e-4), epoch


def test_irra_parameter_groups_follow_solver_build() -> None:
    recipe = get_recipe("irra")
    config = recipe.config("tiny")
    config["model"]["num_classes"] = 5
    model = recipe.build_model(config)
    settings = {}
    for group in recipe.param_groups(model, config):
        for name in group["param_names"]:
            settings[name] = (group["lr"], group["weight_decay"])
    base, wd = config["lr"], config["weight_decay"]
    assert settings["base_model.visual.conv1.weight"] == (base, wd)
    assert settings["cross_attn.in_proj_weight"] == (5 * base, wd)  # "cross": x5
    assert settings["cross_attn.in_proj_bias"] == (2 * base, 0.0)  # "bias" overrides "cross"
    assert settings["classifier.weight"] == (5 * base, wd)
    assert settings["mlm_head.fc.bias"] == (5 * base, 0.0)  # lr x5 again, weight decay stays 0
    assert settings["ln_pre_t.weight"] == (base, wd)  # no "cross" in the name
    official = recipe.config("official")
    optimizer = recipe.optimizer(recipe.param_groups(model, official), official)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["eps"] == 1e-3
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.param_groups[0]["lr"] == 1e-5


def test_ivt_schedule_and_groups() -> None:
    recipe = get_recipe("ivt")
    config = recipe.config("official")
    factor = recipe.lr_multiplier(config, steps_per_epoch=1)
    assert factor(0) * config["lr"] == pytest.approx(5e-5)  # warmup_lr_init = 0.01 x base
    assert factor(5) == pytest.approx(0.002 + 0.998 * 0.5 * (1 + math.cos(math.pi * 5 / 120)))
    assert factor(120) == pytest.approx(0.002)
    tiny = recipe.config("tiny")
    tiny["optimizer"] = "sgd"
    model = recipe.build_model(tiny)
    groups = recipe.param_groups(model, tiny)
    bias_group = next(g for g in groups if all("bias" in n for n in g["param_names"]))
    assert bias_group["lr"] == 2 * tiny["lr"] and bias_group["weight_decay"] == tiny["weight_decay"]
    assert isinstance(recipe.optimizer(groups, tiny), torch.optim.SGD)


def test_laps_hinge_uses_all_negatives_with_warmup_then_the_hardest() -> None:
    recipe = get_recipe("laps")
    config = recipe.config("tiny", vse_mean_warmup_epochs=recipe.config("official")["vse_mean_warmup_epochs"])
    model = recipe.build_model(config).train()
    torch.manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32), "input_ids": torch.randint(1000, 2000, (4, 7)),
             "lengths": torch.full((4,), 7), "img_ids": torch.tensor([0, 0, 1, 2])}
    batch["input_ids"][:, 0] = 101

    def losses(epoch: int, step_in_epoch: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        ctx = StepContext(epoch, 0, step_in_epoch, 10, config, torch.device("cpu"))
        with torch.no_grad():
            return recipe.loss(model, batch, ctx)

    first, middle, later = losses(0, 0), losses(0, 5), losses(1, 5)
    assert float(first["align_loss"]) == 0.0  # warm-up alpha = 0 / n_batch
    assert not bool(middle["hardest_negative"]) and bool(later["hardest_negative"])
    assert float(middle["align_loss"]) > 0
    assert float(later["align_loss"]) <= 2 * float(middle["align_loss"])  # hardest-only <= sum of all (x alpha)


# ----------------------------------------------------------------------------------- demo export compaction


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compacted_demo_export_gives_the_same_outputs_on_the_demo_texts(method: str, data_root: Path,
                                                                        tmp_path: Path) -> None:
    """``training.demo.compact_vocabulary`` zeroes only vocabulary rows the synthetic texts never use and
    deflates the file: the service adapter loads it and gives the same outputs on those texts."""
    import shutil
    import zipfile

    from training.demo import METHOD_DATA, compact_vocabulary, synthetic_texts

    recipe = get_recipe(method)
    kind = METHOD_DATA[method]
    config = tiny_config(method, epochs=100)
    result = train(recipe, data_root / kind, tmp_path / "run", config, max_steps=1, progress=False)
    compacted = tmp_path / "compact.pth"
    shutil.copyfile(result.export_path, compacted)
    texts = synthetic_texts(data_root / kind, kind)
    keep = recipe.text_token_ids(texts, config)
    kept, rows = compact_vocabulary(compacted, recipe.word_embedding_key, keep)
    assert 10 < kept == len(keep) < rows / 20
    assert compacted.stat().st_size < 0.7 * result.export_path.stat().st_size
    with zipfile.ZipFile(compacted) as archive:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())

    original, task = _load_adapter(method, result.export_path)
    small, _ = _load_adapter(method, compacted)
    dropped = sorted(set(range(rows)) - keep)[:50]
    sample = texts[:3]
    image = Image.new("RGB", (48, 96), (200, 30, 30))
    with torch.no_grad():
        if task == "search":
            assert np.array_equal(np.asarray(original.encode_texts(sample)), np.asarray(small.encode_texts(sample)))
        elif task == "ground":
            def boxes(model: Any) -> list[Any]:
                return [(r["box_xyxy"], r["per_scale_boxes"]) for r in model.ground(image, sample)]

            assert boxes(original) == boxes(small)
        else:
            for a, b in zip(original.segment(image, sample), small.segment(image, sample), strict=True):
                assert (a == b).all()
    (vocab, before) = ([v for v in _adapter_module(model).state_dict().values() if v.dim() == 2 and v.shape[0] == rows]
                       for model in (small, original))
    assert not vocab[0][dropped].any() and before[0][dropped].any()
    assert torch.equal(vocab[0][sorted(keep)], before[0][sorted(keep)])


def test_irra_export_records_head_counts_the_width_rule_would_not_give(data_root: Path, tmp_path: Path) -> None:
    """Official IRRA files carry no head counts (the loader's rule is width // 64); a trained file records
    them, so a 128-wide tower with 4 heads loads as 4 heads and gives the trained model's features."""
    config = tiny_config("irra", epochs=100)
    config["model"].update(vision_width=128, vision_heads=4)
    result = train(get_recipe("irra"), data_root / "person", tmp_path, config, max_steps=1, progress=False)
    model, _ = _load_adapter("irra", result.export_path)
    assert model.model.config.vision_heads == 4 and model.model.config.text_heads == 1
    image = Image.new("RGB", (16, 48), (30, 200, 30))
    served = np.asarray(model.encode_images([image]))
    trained = get_recipe("irra").build_model(torch.load(tmp_path / "last.pth", weights_only=True)["config"])
    trained.load_state_dict(torch.load(tmp_path / "last.pth", weights_only=True)["model"])
    wrong_heads = get_recipe("irra").build_model({**config, "model": {**config["model"], "vision_heads": 2}})
    wrong_heads.load_state_dict(trained.state_dict())
    pixels = model.pixel_values([image])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(trained.base_model.encode_image(pixels)[:, 0].float(), dim=-1)
        other = torch.nn.functional.normalize(wrong_heads.base_model.encode_image(pixels)[:, 0].float(), dim=-1)
    assert np.allclose(served, expected.numpy(), atol=2e-3)
    assert not np.allclose(served, other.numpy(), atol=2e-3)


def test_ivt_export_records_its_head_count(data_root: Path, tmp_path: Path) -> None:
    """As for IRRA: an IVT file from training.train keeps 4 heads on a 64-wide encoder (the official rule,
    width // 64, would give 1)."""
    config = tiny_config("ivt", epochs=100)
    config["model"]["num_heads"] = 4
    result = train(get_recipe("ivt"), data_root / "person", tmp_path, config, max_steps=1, progress=False)
    model, _ = _load_adapter("ivt", result.export_path)
    assert model.model.config.num_heads == 4
    assert model.encode_texts(["a person in a red shirt"]).shape[0] == 1


def test_ivt_without_augmentation_equals_three_identical_views(data_root: Path) -> None:
    """``img_aug`` False (the demo) reads one plain view, encodes it once for the word / phrase / sentence texts
    and pads each text level to its own longest text: the same CMPM as the official three-view path given three
    copies of that view and the whole batch padded to its longest text."""
    from models.ivt import cmpm_loss
    from training.recipes.ivt import encode_image_bmm, encode_text_bmm

    recipe = get_recipe("ivt")
    config = tiny_config("ivt", img_aug=False, use_bmm=False)
    dataset = recipe.train_dataset(data_root / "person", config)
    assert len(dataset[0]["images"]) == 1
    seed_everything(0)
    model = recipe.build_model(config).eval()
    seed_everything(1234)
    batch = recipe.collate([dataset[i] for i in range(int(config["batch_size"]))], config)
    lengths = batch["attention_mask"].sum(dim=1).reshape(3, -1).amax(dim=1)
    assert len(set(lengths.tolist())) > 1  # the levels do pad to different lengths
    ctx = StepContext(epoch=1, step=0, step_in_epoch=0, steps_per_epoch=1, config=config, device=torch.device("cpu"))
    with torch.no_grad():
        fast = recipe.loss(model, batch, ctx)["cmpm_loss"]
        encoder = model.encoder_vl
        image_feats = encode_image_bmm(encoder, batch["images"].repeat(3, 1, 1, 1), 0.0)
        text_feats = encode_text_bmm(encoder, batch["input_ids"], batch["attention_mask"], 0.0)
        reference = cmpm_loss(image_feats, text_feats, batch["pids"])
    assert torch.isfinite(fast) and torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)


def test_demo_manifest_records_the_training_machine() -> None:
    from training.demo import machine_description

    torch.set_num_threads(1)
    try:
        described = machine_description()
    finally:
        torch.set_num_threads(2)
    assert described["cpu"] and described["torch"] == torch.__version__ and described["threads"] == 1
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():  # Linux x86: the generation is recorded too
        assert "family" in described["cpu"] and "model" in described["cpu"]


def test_demo_queues_cover_every_method_once_and_beat_longest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """``training.demo.balanced_queues``: each method in exactly one queue, at most ``jobs`` queues, and the
    longest queue no longer than a shared longest-first queue would make it (for times where that is worse)."""
    import training.demo as demo

    times = {"irra": 465.0, "ivt": 552.0, "laps": 422.0, "scanformer": 700.0, "magnet": 600.0}
    monkeypatch.setattr(demo, "EXPECTED_SECONDS", times)
    queues = demo.balanced_queues(list(times), 2)
    assert len(queues) == 2 and sorted(m for q in queues for m in q) == sorted(times)
    span = max(sum(times[m] for m in q) for q in queues)
    finish = [0.0, 0.0]  # a shared queue, longest first: the next method goes to whichever process is free
    for method in sorted(times, key=lambda m: -times[m]):
        finish[finish.index(min(finish))] += times[method]
    assert span <= max(finish) - 100
    assert demo.balanced_queues(["ivt"], 2) == [["ivt"]]
    assert demo.balanced_queues(list(times), 1) == [sorted(times, key=lambda m: -times[m])]


def test_scanformer_scratch_position_grid_varies_everywhere_and_respects_distance() -> None:
    """The demo's fixed sin-cos ``pos_embed``: every channel must vary across the grid (no near-constant
    channel), and each node's nearest other node in embedding space must be a grid neighbour (no aliased
    frequency that makes far nodes look alike)."""
    from training.recipes.scanformer import sincos_position_grid

    grid, dim = 8, 32
    table = sincos_position_grid(grid, dim)
    assert table.shape == (grid * grid, dim)
    spread = table.max(dim=0).values - table.min(dim=0).values
    assert float(spread.min()) > 0.5, spread
    distances = torch.cdist(table, table)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.argmin(dim=1)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    grid_step = (rows[nearest] - rows).abs() + (cols[nearest] - cols).abs()
    assert bool((grid_step == 1).all()), grid_step.view(grid, grid)


def test_scanformer_collate_gives_the_rows_of_tokenising_the_batch_at_once(data_root: Path) -> None:
    """ScanFormer's dataset tokenises each (flipped) text once through a cache; the collated ids and mask
    equal tokenising the batch's final texts together, padded to ``max_text_len``."""
    from models.tokenizers import bert_tokenizer

    recipe = get_recipe("scanformer")
    config = tiny_config("scanformer")
    dataset = recipe.train_dataset(data_root / "refer", config)
    torch.manual_seed(0)
    samples = [dataset[i % len(dataset)] for i in range(2 * len(dataset) // 3)] * 2  # repeats hit the cache
    batch = recipe.collate(samples, config)
    max_len = int(config["model"]["vilt"]["max_text_len"])
    expected = bert_tokenizer()([s["text"] for s in samples], padding="max_length", truncation=True,
                                max_length=max_len, return_tensors="pt")
    assert batch["input_ids"].shape == (len(samples), max_len)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert any("right" in s["text"] for s in samples) and any("left" in s["text"] for s in samples)


def test_scanformer_box_cell_targets_mark_the_cells_a_box_overlaps() -> None:
    from training.recipes.scanformer import box_cell_targets

    boxes = torch.tensor([[0.125, 0.125, 0.1, 0.1],  # inside the top-left cell of a 4x4 grid
                          [0.5, 0.625, 0.2, 0.1],  # across the two middle columns of the third row
                          [0.5, 0.5, 1.0, 1.0]])  # the whole canvas
    cells = box_cell_targets(boxes, 4).view(3, 4, 4)
    expected_first = torch.zeros(4, 4)
    expected_first[0, 0] = 1
    expected_second = torch.zeros(4, 4)
    expected_second[2, 1:3] = 1  # rows are y, columns are x, as the row-major patch order
    assert torch.equal(cells[0], expected_first)
    assert torch.equal(cells[1], expected_second)
    assert bool((cells[2] == 1).all())
    assert torch.equal(box_cell_targets(boxes[:1], 2), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_scanformer_selection_box_loss_trains_the_selection_towards_the_target_cells() -> None:
    """The demo aid reaches the selection head and the text embeddings, covers the last scale only when asked,
    and a few steps on it alone raise the selection logits of the target's cells above the others."""
    from models.tokenizers import bert_tokenizer
    from training.recipes.scanformer import box_cell_targets, selection_box_loss

    recipe = get_recipe("scanformer")
    config = tiny_config("scanformer", select_box_weight=1.0)
    seed_everything(0)
    model = recipe.build_model(config)
    model.train()
    tokens = bert_tokenizer()(["the red star", "the blue circle"], return_tensors="pt", padding=True)
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.75, 0.75, 0.3, 0.3]])
    grids = model.cfg.grid_sizes
    out = model(tokens["input_ids"], tokens["attention_mask"], images)
    assert len(out.select_scores) == model.cfg.num_scales - 1
    every = model(tokens["input_ids"], tokens["attention_mask"], images, score_every_scale=True)
    assert len(every.select_scores) == model.cfg.num_scales
    selection_box_loss(out, boxes, grids).backward()
    assert float(model.select_head.fc2.weight.grad.abs().sum()) > 0
    assert float(model.text_embeddings.word_embeddings.weight.grad.abs().sum()) > 0

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        out = model(tokens["input_ids"], tokens["attention_mask"], images, score_every_scale=True)
        selection_box_loss(out, boxes, grids).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(tokens["input_ids"], tokens["attention_mask"], images, merge_constant_tokens=False,
                    score_every_scale=True)
    last = out.select_scores[-1]
    target = box_cell_targets(boxes, grids[-1]).bool()
    assert float(last[target].min()) > float(last[~target].max())


def test_scanformer_word_init_std_makes_a_word_look_alike_at_every_position() -> None:
    """At the default N(0, 0.02) the word, position and type tables are equally large, so after the
    LayerNorm one word at two positions is barely alike; ``word_init_std`` 0.1 makes the word dominate."""
    recipe = get_recipe("scanformer")
    ids = torch.tensor([[101, 2417, 2732, 102], [101, 1996, 2417, 2732]])  # "red" at positions 1 and 2

    def same_word_cosine(word_std: float) -> float:
        seed_everything(0)
        model = recipe.build_model({**recipe.config("demo"), "word_init_std": word_std})
        with torch.no_grad():
            text = model.text_embeddings(ids)
        return float(torch.nn.functional.cosine_similarity(text[0, 1], text[1, 2], dim=0))

    assert same_word_cosine(0.0) < 0.8
    assert same_word_cosine(0.1) > 0.9


def test_demo_manifest_updates_keep_what_another_run_wrote_meanwhile(tmp_path: Path) -> None:
    """Two partial demo runs into one folder: each writes its method into the file as it is on disk, so the
    entry the other run wrote after this one started is kept; a partial run keeps the whole run's command and
    wall time, a whole run replaces them."""
    from training.demo import update_manifest

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"command": "old", "total_seconds": 1500.0, "models": {"irra": {"file": "irra.pth"}}}))
    header = {"command": "python -m training.demo --out weights/demo", "seed": 0}
    update_manifest(path, header, "scanformer", {"file": "scanformer.pth"}, None)  # the first partial run ends
    update_manifest(path, header, "magnet", {"file": "magnet.pth"}, None)  # the second, started before that
    manifest = json.loads(path.read_text())
    assert set(manifest["models"]) == {"irra", "scanformer", "magnet"}
    assert manifest["command"] == "old" and manifest["total_seconds"] == 1500.0  # partial: the whole run's
    assert manifest["seed"] == 0
    update_manifest(path, header, "magnet", {"file": "magnet.pth", "seconds": 2.0}, 1234.56)  # a whole run
    manifest = json.loads(path.read_text())
    assert manifest["models"]["magnet"]["seconds"] == 2.0 and manifest["total_seconds"] == 1234.6
    assert manifest["command"] == header["command"]
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no staging file left behind


def test_ivt_shared_colour_batches_use_the_synthetic_colour_labels(data_root: Path) -> None:
    """``shared_colour_fraction`` (demo aid) groups identities by the generator's (upper, lower) clothing colours;
    without those labels (real annotation files) it refuses instead of silently drawing plain batches."""
    recipe = get_recipe("ivt")
    config = tiny_config("ivt", shared_colour_fraction=0.5)
    dataset = recipe.train_dataset(data_root / "person", config)
    assert all(s.labels and s.labels["upper_colour"] for s in dataset.samples)
    grouped = recipe.epoch_order(dataset, config, seed=0, epoch=0)
    plain = recipe.epoch_order(dataset, {**config, "shared_colour_fraction": 0.0}, seed=0, epoch=0)
    assert len(grouped) == len(plain) and len(set(grouped)) == len(grouped)
    for sample in dataset.samples:
        sample.labels = None
    with pytest.raises(ValueError, match="clothing colours"):
        recipe.epoch_order(dataset, config, seed=0, epoch=0)


def test_irra_identity_sampler_batches_whole_identities(data_root: Path) -> None:
    """IRRA's ``sampler`` option: "random" leaves the trainer's shuffle; "identity" gives batches of
    ``batch_size // num_instance`` identities with ``num_instance`` items each (the synthetic colour labels now
    reach IRRA's reader too, for the shared-colour demo aid); anything else is refused."""
    recipe = get_recipe("irra")
    config = tiny_config("irra", batch_size=8, num_instance=2, sampler="random")
    dataset = recipe.train_dataset(data_root / "person", config)
    assert recipe.epoch_order(dataset, config, seed=0, epoch=0) is None
    assert all(s.labels and s.labels["upper_colour"] for s in dataset.samples)
    for fraction in (0.0, 0.5):
        order = recipe.epoch_order(dataset, {**config, "sampler": "identity", "shared_colour_fraction": fraction},
                                   seed=0, epoch=0)
        assert order and len(order) % 8 == 0
        for start in range(0, len(order), 8):
            pids = [dataset.samples[i].pid for i in order[start:start + 8]]
            assert len(set(pids)) == 4 and all(pids.count(pid) == 2 for pid in pids)
    with pytest.raises(ValueError, match="sampler"):
        recipe.epoch_order(dataset, {**config, "sampler": "softmax"}, seed=0, epoch=0)


def test_torchrun_trains_with_two_processes_logs_once_and_resumes(data_root: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo on the CPU): DistributedDataParallel over two ranks, each step
    logged once by rank 0, both ranks' random states in the checkpoint, resume continuing at the next step, and
    the export loading in the service."""
    import os
    import subprocess
    import sys

    def torchrun(*extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "training.train", "irra", "--data", str(data_root / "person"), "--out", str(tmp_path),
                   "--config", "tiny", "--device", "cpu", "--threads", "1", "--no-progress",
                   "--set", "epochs=100", "log_every=1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("--max-steps", "2")
    state = torch.load(tmp_path / "last.pth", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2
    torchrun("--max-steps", "3", "--resume")
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3]
    assert torch.load(tmp_path / "last.pth", weights_only=False)["step"] == 3
    model, _ = _load_adapter("irra", tmp_path / get_recipe("irra").export_name)
    assert model.encode_texts(["a person in a red shirt"]).shape[0] == 1
