"""MagNet: shapes, Swin window padding, strict checkpoint loading, official quirks, the service segmenter.

The full-size parity forwards (Swin-B at 480) run from tests/parity/magnet through tests/test_parity.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoint import CheckpointMismatchError
from models.magnet import (
    MagNet,
    MagNetConfig,
    MagNetSegmenter,
    WordPixelAttention,
    checkpoint_filter_fn,
    load_magnet_checkpoint,
    mask_probabilities,
    rasterize_refer_segmentation,
    reference_target,
    tokenize_expressions,
)
from models.magnet_swin import SwinBlock
from models.parity import compare_keys, read_keys_tsv

KEYS_TSV = Path(__file__).parent / "parity" / "magnet" / "keys-swinb-window12.tsv"

SMALL = MagNetConfig(
    img_size=96, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
    hidden_size=32, lang_heads=2, lang_ffn=64, max_position_embeddings=32, lang_stage_ends=(1, 2, 3, 4),
    decoder_dim=32, mask_dim=32, decoder_heads=4, group_norm_groups=8, pixel_decoder_layers=1,
    pixel_decoder_ffn=64, decoder_layers=3, decoder_ffn=64,
)


@pytest.fixture(scope="module")
def small_model() -> MagNet:
    torch.manual_seed(0)
    model = MagNet(SMALL).eval()
    with torch.no_grad():  # non-zero gates so the fusion paths matter
        for name, p in model.named_parameters():
            if "res_gate" in name:
                p.normal_(0, 0.2)
    return model


def _inputs(batch: int, size: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, size, size, generator=g)
    ids = torch.randint(1000, 5000, (batch, 20), generator=g)
    mask = torch.zeros(batch, 20, dtype=torch.long)
    for b in range(batch):
        mask[b, : 5 + 4 * b] = 1
    return pixels, ids * mask, mask


def test_small_forward_shapes(small_model: MagNet) -> None:
    pixels, ids, mask = _inputs(2)
    with torch.no_grad():
        out = small_model(pixels, ids, mask, return_features=True)
    assert out["pred_logits"].shape == (2, 1, 2)
    assert out["pred_masks"].shape == (2, 1, 24, 24)
    assert [tuple(f.shape) for f in out["features"]] == [(2, 32, 24, 24), (2, 64, 12, 12), (2, 128, 6, 6),
                                                          (2, 256, 3, 3)]
    assert out["language"].shape == (2, 20, 32)
    assert torch.isfinite(out["pred_masks"]).all()


def test_one_image_many_expressions_equals_one_by_one(small_model: MagNet) -> None:
    """The shared patch stem is broadcast; no sample couples with another (no batch statistics)."""
    pixels, ids, mask = _inputs(3)
    with torch.no_grad():
        batched = small_model(pixels, ids, mask)["pred_masks"]
        singles = torch.cat([small_model(pixels, ids[i:i + 1], mask[i:i + 1])["pred_masks"] for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


# --------------------------------------------------------------------------------------------- Swin padding


def _naive_swin_block(block: SwinBlock, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Independent per-window reference: zero-pad after norm1 to a window multiple, roll, attend per window with
    the relative-position table looked up coordinate by coordinate and -100 across shift regions."""
    win, shift = block.window, block.shift
    heads = block.attn.num_heads
    c = x.shape[-1]
    hp, wp = -(-h // win) * win, -(-w // win) * win
    y = torch.zeros(hp, wp, c)
    y[:h, :w] = block.norm1(x[0]).view(h, w, c)
    region = torch.zeros(hp, wp, dtype=torch.long)
    if shift:
        y = torch.roll(y, (-shift, -shift), (0, 1))
        row_edges, col_edges = [0, hp - win, hp - shift, hp], [0, wp - win, wp - shift, wp]
        for i, j in itertools.product(range(3), range(3)):
            region[row_edges[i]:row_edges[i + 1], col_edges[j]:col_edges[j + 1]] = 3 * i + j
    out = torch.zeros_like(y)
    table = block.attn.relative_position_bias_table
    for r0, c0 in itertools.product(range(0, hp, win), range(0, wp, win)):
        tokens = y[r0:r0 + win, c0:c0 + win].reshape(-1, c)
        labels = region[r0:r0 + win, c0:c0 + win].reshape(-1)
        coords = [(a, b) for a in range(win) for b in range(win)]
        bias = torch.stack([torch.stack([table[(p[0] - q[0] + win - 1) * (2 * win - 1) + (p[1] - q[1] + win - 1)]
                                         for q in coords]) for p in coords]).permute(2, 0, 1)
        qkv = block.attn.qkv(tokens).view(-1, 3, heads, c // heads).permute(1, 2, 0, 3)
        logits = (qkv[0] * block.attn.scale) @ qkv[1].transpose(-1, -2) + bias
        logits = logits + (labels[:, None] != labels[None, :]).float() * -100.0
        att = (logits.softmax(-1) @ qkv[2]).transpose(0, 1).reshape(-1, c)
        out[r0:r0 + win, c0:c0 + win] = block.attn.proj(att).view(win, win, c)
    if shift:
        out = torch.roll(out, (shift, shift), (0, 1))
    x = x + out[:h, :w].reshape(1, h * w, c)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(3, 3), (6, 5)])
def test_swin_block_pads_to_window_multiple(shift: int, size: tuple[int, int]) -> None:
    """Maps smaller than / not a multiple of the window keep the full window and the shift (LAVT/mmseg rule)."""
    torch.manual_seed(2)
    block = SwinBlock(dim=8, num_heads=2, window=4, shift=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        h, w = size
        x = torch.randn(1, h * w, 8)
        from models.magnet_swin import shifted_window_mask

        got = block(x, h, w, shifted_window_mask(h, w, 4, x.device))
        want = _naive_swin_block(block, x, h, w)
    assert block.attn.relative_position_bias_table.shape == (49, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- checkpoints


def test_full_model_has_the_official_layout() -> None:
    """Names and shapes of the released 1310-entry files (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MagNet(MagNetConfig())
    assert compare_keys(model, read_keys_tsv(KEYS_TSV)) == []
    int_entries = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert len(int_entries) == 24 and all(k.endswith("relative_position_index") for k in int_entries)


def test_strict_load_of_official_layout_file(tmp_path: Path, small_model: MagNet) -> None:
    state = {f"module.{k}": v.clone() for k, v in small_model.state_dict().items()}
    path = tmp_path / "magnet_small.pth"
    torch.save({"model": state}, path)
    loaded = load_magnet_checkpoint(path, SMALL)
    for key, value in small_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels, ids, mask = _inputs(1)
    with torch.no_grad():
        want = small_model(pixels, ids, mask)["pred_masks"]
        torch.testing.assert_close(loaded(pixels, ids, mask)["pred_masks"], want)


def test_strict_load_names_every_problem(tmp_path: Path, small_model: MagNet) -> None:
    state = dict(small_model.state_dict())
    del state["lang_proj.weight"]  # unused at inference, but the official files have it
    state["language_model.pooler.dense.weight"] = torch.zeros(32, 32)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_magnet_checkpoint(path, SMALL)
    assert "lang_proj.weight" in str(err.value) and "language_model.pooler.dense.weight" in str(err.value)


def test_wrong_window_is_reported(tmp_path: Path, small_model: MagNet) -> None:
    state = dict(small_model.state_dict())
    key = "image_model.layers.0.blocks.0.attn.relative_position_bias_table"
    state[key] = torch.zeros(11 * 11, 1)  # a window-6 table
    path = tmp_path / "w6.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match="window is 6, the model's 7"):
        load_magnet_checkpoint(path, SMALL)


def test_filter_drops_only_mechanical_extras(small_model: MagNet) -> None:
    state = {k: v for k, v in small_model.state_dict().items()}
    state["language_model.embeddings.position_ids"] = torch.arange(32)[None]
    filtered = checkpoint_filter_fn({"model": state})
    assert set(filtered) == set(small_model.state_dict())


# --------------------------------------------------------------------------------------------- quirks


def test_language_fusion_uses_extended_mask_quirk() -> None:
    """Valid words get query 0 -> uniform attention over pixels -> identical fused vectors for all valid words;
    the result depends on how many pads follow (QUIRK 1), so inputs must always be padded to 20."""
    torch.manual_seed(3)
    att = WordPixelAttention(vis_dim=16, lang_dim=24).eval()
    pixels, words = torch.randn(1, 30, 16), torch.randn(1, 20, 24)
    binary = torch.zeros(1, 20)
    binary[0, :7] = 1
    extended = (1.0 - binary[:, None, None, :]) * -10000.0
    with torch.no_grad():
        out = att(pixels, words, extended)
        fewer_pads = att(pixels, words[:, :12], extended[..., :12])
    torch.testing.assert_close(out[0, :7], out[0, :1].expand(7, -1))
    assert not torch.allclose(out[0, 0], out[0, 10])
    assert not torch.allclose(out[0, :7], fewer_pads[0, :7], atol=1e-3)


def test_mask_probabilities_are_sigmoid_of_align_corners_upsampling() -> None:
    logits = torch.randn(2, 1, 6, 6)
    class_logits = torch.randn(2, 1, 2) * 5  # QUIRK 2: has no effect
    probs = mask_probabilities(class_logits, logits, (11, 16))
    assert probs.shape == (2, 1, 11, 16)
    # align_corners=True puts the corner pixels exactly on the corner logits (False would not)
    torch.testing.assert_close(probs[:, 0, 0, 0], logits[:, 0, 0, 0].sigmoid())
    torch.testing.assert_close(probs[:, 0, -1, -1], logits[:, 0, -1, -1].sigmoid())
    want = F.interpolate(logits, size=(11, 16), mode="bilinear", align_corners=True).sigmoid()
    torch.testing.assert_close(probs, want)


# --------------------------------------------------------------------------------------------- preprocessing


def test_tokens_truncated_to_20_and_zero_padded() -> None:
    long_text = " ".join(["red"] * 30)
    ids, mask = tokenize_expressions([long_text, "a dog"])
    assert ids.shape == mask.shape == (2, 20)
    assert ids[0, 0] == 101 and (ids[0] != 102).all() and mask[0].all()  # [SEP] cut off past 18 wordpieces
    assert ids[1, :4].tolist() == [101, 1037, 3899, 102] and (ids[1, 4:] == 0).all()
    assert mask[1].tolist() == [1] * 4 + [0] * 16


def test_polygon_parts_overlap_becomes_background() -> None:
    square_a = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    square_b = [20.0, 20.0, 40.0, 20.0, 40.0, 40.0, 20.0, 40.0]
    counts = rasterize_refer_segmentation([square_a, square_b], 50, 50)
    assert counts.max() == 2 and counts[25, 25] == 2 and counts[15, 15] == 1
    target = reference_target(counts, 50)
    assert target[25, 25] == 0 and target[15, 15] == 1 and target.dtype == np.int64
    assert reference_target(counts, 100).sum() == pytest.approx(4 * target.sum(), rel=0.05)


# --------------------------------------------------------------------------------------------- segmenter


def _segmenter(precision: str = "fp32") -> MagNetSegmenter:
    torch.manual_seed(0)
    seg = MagNetSegmenter.from_config(SMALL, precision=precision)
    with torch.no_grad():
        for name, p in seg.model.named_parameters():
            if "res_gate" in name:
                p.normal_(0, 0.2)
    return seg


def test_segment_returns_original_size_maps() -> None:
    seg = _segmenter()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    maps = seg.segment(image, ["the man on the left", "a red car", "dog"])
    assert len(maps) == 3
    for m in maps:
        assert m.shape == (50, 70) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0
    assert not np.allclose(maps[0], maps[1])
    seg.max_batch = 2  # chunked batches give the same maps
    again = seg.segment(image, ["the man on the left", "a red car", "dog"])
    for a, b in zip(maps, again, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert seg.segment(image, []) == []


def test_segment_at_network_size_is_the_official_output() -> None:
    seg = _segmenter()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    from models.magnet import preprocess_image

    ids, mask = tokenize_expressions(["left zebra"])
    with torch.no_grad():
        out = seg.model(preprocess_image(image, 96)[None], ids, mask)
    official = mask_probabilities(out["pred_logits"], out["pred_masks"], (96, 96))[0, 0].numpy()
    np.testing.assert_allclose(seg.segment(image, ["left zebra"])[0], official, atol=1e-6)


def test_segment_bf16_close_to_fp32() -> None:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    fp32 = _segmenter("fp32").segment(image, ["the dog"])[0]
    bf16 = _segmenter("bf16").segment(image, ["the dog"])[0]
    assert bf16.dtype == np.float32 and bf16.shape == (40, 60)
    assert np.abs(fp32 - bf16).max() < 0.1
    with pytest.raises(ValueError):
        MagNetSegmenter.from_config(SMALL, precision="int8")


def test_deformable_sampling_chunks_match_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query chunking (memory bound at 480 px) must not change any sample, and the sampling is bilinear with
    zero padding at align_corners=False: a location at a pixel centre returns that pixel's value."""
    import models.deformable_attention as da

    g = torch.Generator().manual_seed(4)
    shapes = [(3, 3), (6, 6)]
    value = torch.randn(2, 45, 4, 8, generator=g)
    locations = torch.rand(2, 45, 4, 2, 3, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(2, 45, 4, 2, 3, generator=g).softmax(-1)
    whole = da.deformable_sample(value, shapes, locations, weights)
    monkeypatch.setattr(da, "SAMPLE_CHUNK_BYTES", 1000)
    torch.testing.assert_close(da.deformable_sample(value, shapes, locations, weights), whole, atol=0, rtol=0)
    # all weight on level 1, point 0, placed at the centre of pixel (row 2, col 4) of the 6x6 level
    locations[..., 1, 0, :] = torch.tensor([(4 + 0.5) / 6, (2 + 0.5) / 6])
    one_hot = torch.zeros_like(weights)
    one_hot[..., 1, 0] = 1.0
    got = da.deformable_sample(value, shapes, locations, one_hot).view(2, 45, 4, 8)
    expected = value[:, 9 + 2 * 6 + 4]  # level 1 starts after the 9 tokens of level 0
    torch.testing.assert_close(got, expected[:, None].expand(-1, 45, -1, -1))


def test_deformable_sampling_hands_the_grid_sampler_contiguous_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every level's grid reaches ``F.grid_sample`` contiguous (PyTorch's CPU sampler takes its vectorised kernel
    only then; ``benchmarks.deformable_sampling``), chunked or not, and the samples are those of the strided
    per-level slices bit for bit."""
    import models.deformable_attention as da
    from benchmarks.deformable_sampling import strided_grids

    g = torch.Generator().manual_seed(5)
    shapes = [(3, 3), (6, 6)]
    value = torch.randn(2, 45, 4, 8, generator=g)
    locations = torch.rand(2, 45, 4, 2, 3, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(2, 45, 4, 2, 3, generator=g).softmax(-1)
    with strided_grids():
        strided = da.deformable_sample(value, shapes, locations, weights)
    sampler = torch.nn.functional.grid_sample
    layouts: list[bool] = []

    def recording_sampler(value: torch.Tensor, grid: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        layouts.append(grid.is_contiguous())
        return sampler(value, grid, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", recording_sampler)
    torch.testing.assert_close(da.deformable_sample(value, shapes, locations, weights), strided, atol=0, rtol=0)
    monkeypatch.setattr(da, "SAMPLE_CHUNK_BYTES", 1000)
    torch.testing.assert_close(da.deformable_sample(value, shapes, locations, weights), strided, atol=0, rtol=0)
    assert len(layouts) > 2 * len(shapes) and all(layouts)


def test_checkpoint_image_size_and_segmenter_from_checkpoint(tmp_path: Path, small_model: MagNet) -> None:
    import argparse

    from models.magnet import image_size_for_checkpoint

    assert image_size_for_checkpoint("weights/magnet_all.pth") == 448  # run_test.sh: --img_size 448
    assert image_size_for_checkpoint("weights/magnet_refcoco+.pth") == 480
    assert image_size_for_checkpoint("x.pth", {"model": {}, "args": argparse.Namespace(img_size=416)}) == 416
    path = tmp_path / "magnet_refcoco.pth"
    torch.save({"model": small_model.state_dict()}, path)
    seg = MagNetSegmenter.from_checkpoint(path, config=SMALL)
    assert seg.version.startswith("magnet-magnet-refcoco-") and seg.method == "magnet"
    image = Image.fromarray(np.full((33, 47, 3), 128, dtype=np.uint8))
    assert seg.segment(image, ["a cat"])[0].shape == (33, 47)
