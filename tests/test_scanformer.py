"""ScanFormer: merging constant tokens, KV-cached scan, selection (paper eq. 1-3), losses, checkpoints, grounder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from models.checkpoint import CheckpointMismatchError
from models.parity import fill_module, read_keys_tsv
from models.scanformer import (
    Letterbox,
    ScanFormer,
    ScanFormerConfig,
    ScanFormerGrounder,
    ScanOutput,
    box_cxcywh_to_xyxy,
    canvas_box_to_image,
    generalized_box_iou,
    load_scanformer_checkpoint,
    save_scanformer_checkpoint,
    scanformer_losses,
)
from models.vilt import ViltConfig, ViltModel

FIXTURES = Path(__file__).parent / "parity" / "vilt"


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models():
    """The tiny test models run fastest on one thread (and do not stall when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _filled_model(**overrides) -> ScanFormer:
    """Small ScanFormer with every float entry set by the parity fill rule (large enough to matter)."""
    model = ScanFormer(ScanFormerConfig.small(**overrides))
    fill_module(model)
    return model.eval()


def _inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(1000, 5000, (batch, 40), generator=gen)
    text_mask = torch.zeros(batch, 40, dtype=torch.long)
    for b in range(batch):
        text_mask[b, : 5 + 3 * b] = 1
    pixels = torch.randn(batch, 3, 128, 128, generator=gen)
    return text_ids, text_mask, pixels


# ------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("keep_fractions", [None, (0.5, 0.375)])
def test_merged_constant_tokens_equal_the_unmerged_sequence(keep_fractions) -> None:
    model = _filled_model()
    text_ids, text_mask, pixels = _inputs(3)
    with torch.no_grad():
        merged = model(text_ids, text_mask, pixels, keep_fractions, merge_constant_tokens=True, return_tokens=True)
        full = model(text_ids, text_mask, pixels, keep_fractions, merge_constant_tokens=False, return_tokens=True)
    counts = merged.kept_counts
    assert torch.equal(counts, full.kept_counts)
    totals = torch.tensor([g * g for g in model.cfg.grid_sizes])
    # the test means something: some scale drops patches, and samples keep different numbers (padding path)
    assert bool((counts[:, 1:] < totals[1:]).any()) and bool((counts[:, 1:] > 0).all())
    if keep_fractions is None:
        assert len({tuple(c) for c in counts.tolist()}) > 1
    for m, f in zip(merged.kept, full.kept, strict=True):
        assert torch.equal(m, f)
    # the merged scan computed fewer query tokens than the unmerged one
    assert sum(s.queries for s in merged.steps) < sum(s.queries for s in full.steps)
    # float32 rounding only: 1e-5 absolute, plus 1e-5 of the value for features of magnitude > 1 (the merged and
    # unmerged sequences reach the same sums in a different order; on AMD Zen 3 MKL a patch feature of 2.6
    # differed by 1.07e-5)
    torch.testing.assert_close(merged.reg_feats, full.reg_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.boxes, full.boxes, atol=1e-5, rtol=1e-5)
    for m, f in zip(merged.patch_feats, full.patch_feats, strict=True):
        torch.testing.assert_close(m, f, atol=1e-5, rtol=1e-5)
    for m, f in zip(merged.select_logits, full.select_logits, strict=True):
        torch.testing.assert_close(m, f, atol=1e-5, rtol=1e-5)


def test_without_the_log_count_bias_merging_would_change_the_result() -> None:
    """Guard for the test above: dropping the +log(Nc) offset must show up."""
    model = _filled_model()
    text_ids, text_mask, pixels = _inputs(2)
    original = model._merged_inputs

    def no_log_bias(patches, selection, scale):
        tokens, key_bias, slots = original(patches, selection, scale)
        if slots["has_const"]:
            key_bias[:, -1] = key_bias[:, -1].clamp(max=0.0)
        return tokens, key_bias, slots

    with torch.no_grad():
        full = model(text_ids, text_mask, pixels, (0.5, 0.375), merge_constant_tokens=False)
        model._merged_inputs = no_log_bias
        wrong = model(text_ids, text_mask, pixels, (0.5, 0.375), merge_constant_tokens=True)
    assert (wrong.reg_feats[:, 1:] - full.reg_feats[:, 1:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ KV cache


def _one_pass_reference(model: ScanFormer, out: ScanOutput, text_ids, text_mask, pixels):
    """The whole sequence [text | scale 0 | scale 1 | ...] in ONE forward under the block-causal mask,
    with the selection factors the scan used. Returns per-scale (reg feature, box, patch hidden states)."""
    cfg = model.cfg
    batch = text_ids.shape[0]
    pieces = [model.embed_text(text_ids)]
    bias_pieces = [torch.zeros(text_mask.shape).masked_fill(text_mask == 0, -math.inf)]
    for scale, image in enumerate(model.build_pyramid(pixels)):
        grid = cfg.grid_sizes[scale]
        patches = image.reshape(batch, 3, grid, 16, grid, 16).permute(0, 2, 4, 1, 3, 5).reshape(batch, grid**2, -1)
        positions = torch.arange(grid * grid).expand(batch, -1)
        tokens = model.mix_constant(model.patch_embeddings(patches, positions, scale), out.selection[scale])
        pieces.append(torch.cat([model.reg_token(scale, batch), tokens], dim=1))
        bias_pieces.append(torch.zeros(batch, tokens.shape[1] + 1))
    sizes = [p.shape[1] for p in pieces]
    block_id = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
    causal = torch.zeros(len(block_id), len(block_id)).masked_fill(block_id[None, :] > block_id[:, None], -math.inf)
    bias = causal[None, None] + torch.cat(bias_pieces, dim=1)[:, None, None, :]
    x = torch.cat(pieces, dim=1)
    for block in model.transformer.blocks:
        x, _ = block(x, bias)
    results, start = [], sizes[0]
    for n in sizes[1:]:
        reg = model.transformer.norm(x[:, start])
        results.append((reg, model.box_head(reg), x[:, start + 1 : start + n]))
        start += n
    return results


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kv_cached_scan_equals_one_forward_with_block_causal_mask(mode: str) -> None:
    model = _filled_model()
    model.train(mode == "train")  # train: soft straight-through factors (dropout is 0 in the small config)
    text_ids, text_mask, pixels = _inputs(2, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(text_ids, text_mask, pixels, merge_constant_tokens=False, return_tokens=True)
        reference = _one_pass_reference(model, out, text_ids, text_mask, pixels)
    if mode == "train":  # soft factors strictly between 0 and 1 occur
        assert any(((s > 0) & (s < 1)).any() for s in out.selection[1:])
    for scale, (reg, box, hidden) in enumerate(reference):
        torch.testing.assert_close(out.reg_feats[:, scale], reg, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.boxes[:, scale], box, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.patch_feats[scale], hidden, atol=1e-5, rtol=0)


def test_scan_feeds_children_of_selected_patches_only() -> None:
    model = _filled_model()
    text_ids, text_mask, pixels = _inputs(2)
    with torch.no_grad():
        out = model(text_ids, text_mask, pixels)
    grids = model.cfg.grid_sizes
    assert bool(out.kept[0].all())  # coarsest scale keeps every patch
    for scale in range(1, len(grids)):
        parent_kept = out.kept[scale - 1].view(-1, grids[scale - 1], grids[scale - 1])
        chosen = parent_kept & (out.select_logits[scale - 1] >= 0).view_as(parent_kept)
        expected = chosen.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)
        assert torch.equal(out.kept[scale], expected)
    # each step's keys = everything before it + its own tokens
    seen = 0
    for step in out.steps:
        seen += step.queries
        assert step.keys == seen


# ------------------------------------------------------------------------------------------ selection


def test_selection_is_straight_through_with_gradient_through_v1() -> None:
    model = ScanFormer(ScanFormerConfig.small(select_noise_std=0.0, select_soft_probability=0.0)).train()
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.2, 4.0], requires_grad=True)
    s = model.selection_factor(logits)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # forward: v2 = 1[r >= 0]
    s.sum().backward()
    v1_grad = 1.2 * torch.sigmoid(logits) * (1 - torch.sigmoid(logits))
    v1 = 1.2 * torch.sigmoid(logits) - 0.1
    v1_grad = torch.where((v1 > 0) & (v1 < 1), v1_grad, torch.zeros_like(v1_grad))
    torch.testing.assert_close(logits.grad, v1_grad.detach())  # backward: d clamp(1.2 sigmoid - 0.1)

    soft = ScanFormer(ScanFormerConfig.small(select_noise_std=0.0, select_soft_probability=1.0)).train()
    torch.testing.assert_close(soft.selection_factor(logits.detach()), v1.clamp(0, 1).detach())
    soft.eval()
    assert soft.selection_factor(logits.detach()).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_training_noise_and_draw_are_random_only_in_training() -> None:
    model = ScanFormer(ScanFormerConfig.small())
    logits = torch.zeros(1000)
    model.train()
    values = model.selection_factor(logits)
    assert 0.3 < float((values == values.round()).float().mean()) < 0.8  # roughly half hard draws (+ clamps)
    model.eval()
    assert torch.equal(model.selection_factor(logits), torch.ones(1000))


# ------------------------------------------------------------------------------------------ losses


def test_giou_and_losses_follow_the_formulas() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert float(generalized_box_iou(a, a)) == pytest.approx(1.0)
    far = torch.tensor([[3.0, 0.0, 4.0, 2.0]])  # hull 4x2 = 8, union 6 -> 0 - 2/8
    assert float(generalized_box_iou(a, far)) == pytest.approx(-0.25)

    cfg = ScanFormerConfig.small(l1_weights=(1.0, 2.0, 3.0), giou_weights=(0.5, 0.5, 1.0),
                                 sparse_weight=2.0, sparse_targets=(0.5, 0.25))
    target = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    boxes = torch.stack([target + 0.1, target, target - 0.05], dim=1)
    selection = [torch.ones(1, 4), torch.tensor([[1.0] * 8 + [0.0] * 8]), torch.tensor([[1.0] * 16 + [0.0] * 48])]
    out = ScanOutput(boxes=boxes, reg_feats=torch.zeros(1, 3, 4), selection=selection, select_logits=[],
                     kept=[s > 0 for s in selection], steps=[])
    losses = scanformer_losses(out, target, cfg)
    l1 = [0.4, 0.0, 0.2]
    giou = [1 - float(generalized_box_iou(box_cxcywh_to_xyxy(boxes[:, s]), box_cxcywh_to_xyxy(target)))
            for s in range(3)]
    expected_bbox = sum(w * v for w, v in zip(cfg.l1_weights, l1, strict=True))
    expected_bbox += sum(w * v for w, v in zip(cfg.giou_weights, giou, strict=True))
    assert float(losses["bbox"]) == pytest.approx(expected_bbox, rel=1e-5)
    assert float(losses["sparse"]) == pytest.approx(2.0 * ((0.5 - 0.5) ** 2 + (0.25 - 0.25) ** 2), abs=1e-7)
    selection[2] = torch.ones(1, 64)
    assert float(scanformer_losses(out, target, cfg)["sparse"]) == pytest.approx(2.0 * 0.75**2, rel=1e-5)


def _synthetic_batch(count: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one bright rectangle on noise; the target is that rectangle (normalised cx, cy, w, h)."""
    gen = torch.Generator().manual_seed(3)
    images = 0.2 * torch.randn(count, 3, size, size, generator=gen) - 0.5
    boxes = []
    for i in range(count):
        x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        w, h = 24 + 8 * i, 40 - 4 * i
        images[i, :, y0 : y0 + h, x0 : x0 + w] = 1.0
        boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
    return images, torch.tensor(boxes)


def test_a_few_adamw_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = ScanFormer(ScanFormerConfig.small(vilt=ViltConfig.small(patch_size=16, vocab_size=5000)))
    images, boxes = _synthetic_batch(4)
    text_ids, text_mask, _ = _inputs(4)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(scanformer_losses(model(text_ids, text_mask, images), boxes, model.cfg)["total"])

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for _ in range(25):
        loss = scanformer_losses(model(text_ids, text_mask, images), boxes, model.cfg)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.train()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
    # gradients reached ScanFormer's own parts through the straight-through selection
    assert model.select_head.fc2.weight.grad is not None and model.select_head.fc2.weight.grad.abs().sum() > 0
    assert model.const_token.grad is not None


# ------------------------------------------------------------------------------------------ checkpoints


def test_shared_parameters_have_the_vilt_b32_checkpoint_layout() -> None:
    official = {name: shape for name, shape, _ in read_keys_tsv(FIXTURES / "keys-vilt-b32.tsv")}
    model = ScanFormer(ScanFormerConfig())
    own = set(model.own_parameter_names())
    shared = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in own}
    assert shared == {k: v for k, v in official.items() if not k.startswith("pooler.")}
    assert own and all(k.startswith(ScanFormer.OWN_PREFIXES) for k in own)


def test_init_from_a_vilt_checkpoint_misses_only_scanformer_parts() -> None:
    vilt = ViltModel(ViltConfig.small(patch_size=16, with_pretrain_heads=True))
    fill_module(vilt)
    model = ScanFormer(ScanFormerConfig.small())
    report = model.init_from_vilt({"state_dict": vilt.state_dict(), "epoch": 0})
    assert report.missing == sorted(model.own_parameter_names())
    assert set(report.missing) == {k for k in model.state_dict() if k not in vilt.state_dict()}
    assert report.unexpected and all(k.startswith(("pooler.", "mlm_score.", "itm_score.")) for k in report.unexpected)
    shared = vilt.state_dict()
    for name, value in model.state_dict().items():
        if name in shared:
            assert torch.equal(value, shared[name]), name


def test_saved_checkpoint_reloads_strictly_and_reproduces_the_boxes(tmp_path: Path) -> None:
    model = _filled_model(image_size=64, num_scales=2, l1_weights=(1, 1), giou_weights=(1, 1), sparse_targets=(0.5,))
    path = tmp_path / "scanformer.pth"
    save_scanformer_checkpoint(model, path, extra={"step": 7})
    loaded = load_scanformer_checkpoint(path).eval()
    assert loaded.cfg == model.cfg
    text_ids, text_mask, _ = _inputs(2)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(text_ids, text_mask, pixels).boxes, model(text_ids, text_mask, pixels).boxes)

    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["box_head.extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["const_token"]
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="const_token"):
        load_scanformer_checkpoint(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------ grounder


def test_letterbox_maps_the_canvas_back_to_original_pixels() -> None:
    # a 200x100 image on a 128 canvas: ratio 0.64, 128x64 centred at y = 32
    box = Letterbox(ratio=0.64, pad_x=0, pad_y=32, width=200, height=100)
    assert canvas_box_to_image([0.5, 0.5, 1.0, 0.5], box, 128) == pytest.approx([0, 0, 200, 100])
    assert canvas_box_to_image([0.25, 0.375, 0.25, 0.125], box, 128) == pytest.approx([25, 12.5, 75, 37.5])
    assert canvas_box_to_image([0.5, 0.5, 2.0, 2.0], box, 128) == pytest.approx([0, 0, 200, 100])  # clipped


def test_grounder_returns_boxes_inside_the_image() -> None:
    torch.manual_seed(0)
    grounder = ScanFormerGrounder.from_config(ScanFormerConfig.small(), seed=0)
    fill_module(grounder.model)  # spread the boxes away from the image centre
    image = Image.new("RGB", (300, 180), (40, 90, 160))
    ImageDraw.Draw(image).rectangle([20, 30, 120, 150], fill=(250, 200, 20))
    expressions = ["the yellow box on the left", "sky", "a " * 80 + "very long expression"]
    results = grounder.ground(image, expressions)
    assert [r["expression"] for r in results] == expressions
    for r in results:
        x1, y1, x2, y2 = r["box_xyxy"]
        assert 0 <= x1 <= x2 <= 300 and 0 <= y1 <= y2 <= 180
        assert r["box_xywh"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert len(r["per_scale_boxes"]) == 3 and r["per_scale_boxes"][-1] == r["box_xyxy"]
        assert r["total_patches"] == [4, 16, 64]
        assert r["kept_patches"][0] == 4
        assert all(k <= t for k, t in zip(r["kept_patches"], r["total_patches"], strict=True))
        assert r["time_ms"] > 0
    assert grounder.version.startswith("scanformer-random-")
    assert grounder.ground(image, []) == []


def test_grounder_from_checkpoint_and_bf16(tmp_path: Path) -> None:
    model = _filled_model()
    save_scanformer_checkpoint(model, tmp_path / "sf.pth")
    fp32 = ScanFormerGrounder.from_checkpoint(tmp_path / "sf.pth", device="cpu", precision="fp32")
    bf16 = ScanFormerGrounder.from_checkpoint(tmp_path / "sf.pth", device="cpu", precision="bf16")
    assert fp32.version == bf16.version and fp32.version.startswith("scanformer-")
    image = Image.new("RGB", (96, 160), (200, 10, 10))
    a, b = fp32.ground(image, ["red"])[0], bf16.ground(image, ["red"])[0]
    assert a["box_xyxy"] != pytest.approx([0, 0, 96, 160])
    assert a["kept_patches"][0] == b["kept_patches"][0] == 4
    with pytest.raises(ValueError):
        ScanFormerGrounder(model, precision="int8")
