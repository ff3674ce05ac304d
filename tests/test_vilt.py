"""ViLT-B/32 backbone: official layout, checkpoint mapping, KV cache, logit bias, ViLT's pixel-mask semantics.

The numerical parity against the official recordings runs in tests/test_parity.py (tests/parity/vilt).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_state_dict_strict
from models.parity import compare_keys, fill_module, read_keys_tsv
from models.vilt import Attention, KVCache, ViltConfig, ViltModel, checkpoint_filter_fn

FIXTURES = Path(__file__).parent / "parity" / "vilt"


def _small_filled(**overrides) -> ViltModel:
    model = ViltModel(ViltConfig.small(**overrides))
    fill_module(model)
    return model.eval()


def test_state_dict_names_are_the_official_vilt_b32_names() -> None:
    keys = read_keys_tsv(FIXTURES / "keys-vilt-b32.tsv")
    heads = read_keys_tsv(FIXTURES / "keys-vilt-b32-pretrain-heads.tsv")
    assert compare_keys(ViltModel(ViltConfig()), keys) == []
    assert compare_keys(ViltModel(ViltConfig(with_pretrain_heads=True)), keys + heads) == []


def test_block_layer_norms_use_the_original_vilt_eps() -> None:
    model = ViltModel(ViltConfig.small())
    assert model.transformer.blocks[0].norm1.eps == 1e-6
    assert model.transformer.norm.eps == 1e-6
    assert model.text_embeddings.LayerNorm.eps == 1e-12


def test_lightning_checkpoint_with_pretrain_heads_loads_strictly() -> None:
    source = _small_filled(with_pretrain_heads=True)
    lightning = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    target = ViltModel(ViltConfig.small())
    weights = checkpoint_filter_fn(lightning, target)
    assert not any(k.startswith(("mlm_score.", "itm_score.")) for k in weights)
    load_state_dict_strict(target, weights)
    for name, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


def test_kv_cached_chunks_equal_one_pass_with_block_causal_mask() -> None:
    torch.manual_seed(0)
    model = _small_filled()
    blocks = model.transformer.blocks
    chunks = [torch.randn(2, n, 64) for n in (5, 3, 7)]
    # one pass: chunk j attends to chunks 0..j
    full = torch.cat(chunks, dim=1)
    block_id = torch.cat([torch.full((c.shape[1],), j) for j, c in enumerate(chunks)])
    bias = torch.zeros(full.shape[1], full.shape[1]).masked_fill(block_id[None, :] > block_id[:, None], -math.inf)
    x = full
    for block in blocks:
        x, _ = block(x, bias[None, None])
    # cached: only the new chunk is computed each time
    cache = KVCache(len(blocks))
    outs = []
    for chunk in chunks:
        new_bias = torch.zeros(2, chunk.shape[1])
        y = chunk
        for i, block in enumerate(blocks):
            y, present = block(y, cache.attention_bias(new_bias), cache.layer(i))
            cache.store(i, *present)
        cache.extend_bias(new_bias)
        outs.append(y)
    assert len(cache) == full.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), x, atol=1e-5, rtol=1e-5)


def test_log_count_bias_on_one_key_equals_repeated_identical_keys() -> None:
    torch.manual_seed(0)
    attn = Attention(ViltConfig.small()).eval()
    queries = torch.randn(1, 4, 64)
    distinct = torch.randn(1, 3, 64)
    constant = torch.randn(1, 1, 64)
    with torch.no_grad():
        _, (k_d, v_d) = attn(distinct)
        _, (k_c, v_c) = attn(constant)
        # 6 copies of the constant key/value
        repeated = (torch.cat([k_d, k_c.expand(-1, -1, 6, -1)], 2), torch.cat([v_d, v_c.expand(-1, -1, 6, -1)], 2))
        out_rep, _ = attn(queries, torch.zeros(1, 1, 1, 9 + 4), repeated)
        merged = (torch.cat([k_d, k_c], 2), torch.cat([v_d, v_c], 2))
        bias = torch.tensor([0.0, 0.0, 0.0, math.log(6)] + [0.0] * 4).view(1, 1, 1, -1)
        out_merged, _ = attn(queries, bias, merged)
        out_plain, _ = attn(queries, torch.zeros(1, 1, 1, 8), merged)
    torch.testing.assert_close(out_merged, out_rep, atol=1e-6, rtol=1e-6)
    assert (out_plain - out_rep).abs().max() > 1e-3  # without the bias the two differ


def test_padded_image_with_pixel_mask_matches_the_unpadded_image() -> None:
    """ViLT semantics: positions are interpolated onto the valid corner and padded patches are masked."""
    torch.manual_seed(0)
    model = _small_filled()
    text_ids = torch.randint(1000, 3000, (1, 40))
    text_masks = torch.zeros(1, 40, dtype=torch.long)
    text_masks[:, :9] = 1
    image = torch.randn(1, 3, 128, 96)
    padded = torch.zeros(1, 3, 160, 160)
    padded[:, :, :128, :96] = image
    pixel_mask = torch.zeros(1, 160, 160, dtype=torch.long)
    pixel_mask[:, :128, :96] = 1
    with torch.no_grad():
        plain = model(text_ids, text_masks, image)
        masked = model(text_ids, text_masks, padded, pixel_mask)
        unmasked = model(text_ids, text_masks, padded)
    valid = masked["image_masks"][0].bool()
    assert int(valid.sum()) == 1 + 4 * 3
    torch.testing.assert_close(masked["image_feats"][:, valid], plain["image_feats"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked["text_feats"], plain["text_feats"], atol=1e-5, rtol=1e-5)
    assert (unmasked["text_feats"] - plain["text_feats"]).abs().max() > 1e-3


@pytest.mark.parametrize("height,width", [(64, 64), (64, 160)])
def test_image_token_count_follows_the_patch_grid(height: int, width: int) -> None:
    model = _small_filled()
    out = model(torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long),
                torch.randn(1, 3, height, width))
    assert out["image_feats"].shape == (1, 1 + (height // 32) * (width // 32), 64)
    assert out["pooled"].shape == (1, 64)
