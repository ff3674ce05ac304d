"""IRRA model: official layout and dtype placement, text cropping, losses, training step, retrieval adapter.

Small configs keep this fast; exact agreement with the official code is the job of tests/parity/irra.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.base import RetrievalModel
from models.clip import resize_visual_pos_embed
from models.irra import (
    IMAGE_MEAN,
    IMAGE_STD,
    IRRA,
    IRRAConfig,
    IRRARetrievalModel,
    apply_precision,
    compute_id,
    compute_mlm,
    compute_sdm,
    crop_to_longest,
    precision_context,
    preprocess_image,
)
from models.parity import fill_module, read_keys_tsv

KEYS_TSV = Path(__file__).parent / "parity" / "irra" / "keys-cuhk.tsv"
SMALL = IRRAConfig(embed_dim=128, image_size=(64, 32), vision_width=128, vision_layers=2, vision_heads=2,
                   text_width=128, text_layers=2, text_heads=2, cmt_depth=1, cross_heads=2, num_classes=7)


@pytest.fixture(scope="module")
def small_model() -> IRRA:
    torch.manual_seed(0)
    model = IRRA(SMALL).eval()
    fill_module(model)
    return model


def _ids(rows: list[list[int]], length: int = 77) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


TEXT = _ids([[49406, 320, 2308, 593, 1538, 1449, 49407], [49406, 320, 786, 49407], [49406, 518, 49407]])


def test_full_size_state_dict_is_the_official_layout() -> None:
    with torch.device("meta"):
        model = IRRA(IRRAConfig())
    official = [(name, shape) for name, shape, _ in read_keys_tsv(KEYS_TSV)]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == official
    assert "logit_scale" not in model.state_dict() and model.logit_scale == 50.0
    assert model.base_model.visual.num_y == 24 and model.base_model.visual.num_x == 8


def test_official_precision_puts_237_entries_in_fp16() -> None:
    with torch.device("meta"):
        model = apply_precision(IRRA(IRRAConfig()), "official")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    half = {k for k, d in dtypes.items() if d == torch.float16}
    assert len(half) == 237 and len(dtypes) - len(half) == 130
    for name in ("base_model.visual.proj", "base_model.text_projection", "base_model.visual.conv1.weight",
                 "cross_attn.in_proj_bias", "classifier.bias", "mlm_head.fc.weight",
                 "base_model.transformer.resblocks.3.attn.out_proj.weight"):
        assert name in half
    for name in ("base_model.token_embedding.weight", "base_model.positional_embedding",
                 "base_model.visual.class_embedding", "base_model.visual.ln_pre.weight", "mlm_head.ln.bias"):
        assert dtypes[name] == torch.float32


def test_heads_follow_loss_names() -> None:
    model = IRRA(IRRAConfig(**{**SMALL.to_dict(), "loss_names": "sdm"}))
    assert not any(k.startswith(("classifier", "cross", "mlm_head", "ln_p")) for k in model.state_dict())


def test_strided_grid_overlapping_patches() -> None:
    config = IRRAConfig(**{**SMALL.to_dict(), "stride_size": 12})
    model = IRRA(config).eval()
    assert config.grid == (5, 2)
    assert model.base_model.visual.positional_embedding.shape == (11, 128)
    with torch.no_grad():
        tokens = model.base_model.encode_image(torch.randn(2, 3, 64, 32))
    assert tokens.shape == (2, 11, 128)


def test_text_feature_is_eot_and_ignores_padding(small_model: IRRA) -> None:
    with torch.no_grad():
        feats = small_model.encode_text(TEXT)
        tokens = small_model.base_model.encode_text(TEXT)
        noisy = TEXT.clone()
        noisy[0, 7:] = 5  # tokens after EOT: the causal mask hides them from the EOT position
        changed = TEXT.clone()
        changed[0, 2] = 1000  # a token before EOT does matter
        feats_noisy = small_model.encode_text(noisy)
        feats_changed = small_model.encode_text(changed)
    assert torch.equal(feats[0], tokens[0, 6].float()) and torch.equal(feats[1], tokens[1, 3].float())
    assert torch.allclose(feats_noisy, feats, atol=1e-6)
    assert not torch.allclose(feats_changed[0], feats[0], atol=1e-3)


def test_cropping_text_to_the_longest_caption_gives_the_same_features(small_model: IRRA) -> None:
    cropped = crop_to_longest(TEXT)
    assert cropped.shape == (3, 7)
    with torch.no_grad():
        full, short = small_model.encode_text(TEXT), small_model.encode_text(cropped)
    # same values up to float rounding (matmul blocking depends on the length): ~1e-6 on values of ~1
    assert torch.allclose(full, short, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 77"):
        small_model.base_model.encode_text(torch.zeros(1, 78, dtype=torch.int64))


def test_image_feature_is_cls_token(small_model: IRRA) -> None:
    pixels = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        tokens = small_model.base_model.encode_image(pixels)
        feats = small_model.encode_image(pixels)
    assert tokens.shape == (2, 9, 128) and torch.equal(feats, tokens[:, 0])


@pytest.mark.parametrize("precision", ["official", "bf16"])
def test_reduced_precisions_stay_close_to_fp32(small_model: IRRA, precision: str) -> None:
    pixels = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_i, ref_t = small_model.encode_image(pixels), small_model.encode_text(TEXT)
        model = apply_precision(IRRA(SMALL).eval(), precision)
        model.load_state_dict(small_model.state_dict())  # copies cast into each parameter's dtype
        with precision_context(precision, "cpu"):
            img, txt = model.encode_image(pixels), model.encode_text(TEXT)
    assert img.dtype == txt.dtype == torch.float32
    if precision == "official":
        assert model.base_model.dtype == torch.float16
    for ours, ref in ((img, ref_i), (txt, ref_t)):
        cosine = F.cosine_similarity(ours, ref, dim=-1)
        assert (cosine > 0.99).all(), cosine
    with pytest.raises(ValueError):
        apply_precision(IRRA(SMALL), "int8")


# --------------------------------------------------------------------------------------------- losses


def _sdm_reference(image: np.ndarray, text: np.ndarray, pids: np.ndarray, scale: float) -> float:
    """SDM written out with loops in float64: sum of KL(p || q) means for both directions (paper's SDM)."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    n = len(pids)
    total = 0.0
    for sim in (image @ text.T, text @ image.T):
        for i in range(n):
            logits = scale * sim[i]
            p = np.exp(logits - logits.max())
            p /= p.sum()
            y = (pids == pids[i]).astype(np.float64)
            q = y / y.sum()
            total += float(np.sum(p * (np.log(p) - np.log(q + 1e-8)))) / n
    return total


def test_sdm_matches_a_loop_reference_and_rewards_alignment() -> None:
    rng = np.random.default_rng(3)
    image, text = rng.standard_normal((6, 16)), rng.standard_normal((6, 16))
    pids = np.array([0, 0, 1, 2, 2, 3])
    ours = compute_sdm(torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(pids), 50.0)
    # the official label matrix is float32 (``.float()``) even for float64 features, hence rel 1e-6
    assert math.isclose(float(ours), _sdm_reference(image, text, pids, 50.0), rel_tol=1e-6)
    # identity-aligned features (each pid its own direction) give a far smaller loss than random ones
    centers = rng.standard_normal((4, 16))
    aligned = torch.from_numpy(centers[pids])
    assert float(compute_sdm(aligned, aligned, torch.from_numpy(pids), 50.0)) < 0.1 * float(ours)


def test_id_and_mlm_losses() -> None:
    gen = torch.Generator().manual_seed(4)
    image_logits, text_logits = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    pids = torch.tensor([0, 3, 3, 6, 1])
    expected = (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2
    assert torch.allclose(compute_id(image_logits, text_logits, pids), expected)
    scores = torch.randn(10, 50, generator=gen)
    labels = torch.tensor([0, 0, 7, 0, 12, 0, 0, 0, 3, 0])
    labelled = labels != 0
    assert torch.allclose(compute_mlm(scores, labels), F.cross_entropy(scores[labelled], labels[labelled]))


def test_training_step_returns_official_losses_and_backpropagates() -> None:
    torch.manual_seed(0)
    model = IRRA(SMALL).train()
    masked = TEXT.clone()
    masked[0, 2] = 49405
    labels = torch.zeros_like(TEXT)
    labels[0, 2] = TEXT[0, 2]
    batch = {"images": torch.randn(3, 3, 64, 32), "caption_ids": masked, "mlm_ids": masked,
             "mlm_labels": labels, "pids": torch.tensor([0, 1, 1])}
    out = model(batch)
    assert {"sdm_loss", "id_loss", "mlm_loss", "img_acc", "txt_acc", "mlm_acc"} <= set(out)
    assert math.isclose(float(out["temperature"]), 0.02, rel_tol=1e-6)
    with torch.no_grad():
        image_tokens = model.base_model.encode_image(batch["images"])
        scores = model.mlm_scores(masked, image_tokens)  # the text tower run separately
    assert torch.allclose(out["mlm_loss"], compute_mlm(scores, labels.reshape(-1)), atol=1e-5)
    total = sum(v for k, v in out.items() if "loss" in k)
    total.backward()
    assert model.mlm_head.fc.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert model.base_model.visual.conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_is_pil_bilinear_then_clip_normalisation() -> None:
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixels = preprocess_image(image, (64, 32))
    assert pixels.shape == (3, 64, 32) and pixels.dtype == np.float32
    resized = np.asarray(image.resize((32, 64), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    expected = (resized - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    assert np.allclose(pixels, expected.transpose(2, 0, 1), atol=1e-6)
    grey = preprocess_image(Image.new("L", (10, 10), 128), (64, 32))  # non-RGB input is converted
    assert np.allclose(grey[1], (128 / 255 - IMAGE_MEAN[1]) / IMAGE_STD[1], atol=1e-6)


def test_pos_embed_resize_keeps_cls_and_is_row_major() -> None:
    table = torch.zeros(1 + 4, 3)
    table[0] = 7.0
    table[1:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # value = row index on a 2x2 grid
    resized = resize_visual_pos_embed(table, 4, 2)
    assert resized.shape == (9, 3) and torch.equal(resized[0], table[0])
    rows = resized[1:, 0].reshape(4, 2)
    assert torch.equal(rows[:, 0], rows[:, 1]) and (rows[1:, 0] >= rows[:-1, 0]).all() and rows[0, 0] == 0


# --------------------------------------------------------------------------------------------- adapter


def _people(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(6)
    return [Image.fromarray(rng.integers(0, 256, (90 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def test_retrieval_adapter_outputs_normalised_batched_embeddings() -> None:
    model = IRRARetrievalModel.from_config(SMALL, fill=True, image_batch_size=2, text_batch_size=2)
    assert isinstance(model, RetrievalModel) and model.version == "crc32-fill" and model.embed_dim == 128
    assert model.model.classifier is None and "mlm_head.fc.weight" not in model.model.state_dict()
    images = _people(5)
    texts = ["a woman in a red coat", "a man with a black backpack and white shoes", "a child", "", "jekyll"]
    img, txt = model.encode_images(images), model.encode_texts(texts)
    for emb in (img, txt):
        assert emb.shape == (5, 128) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one_batch = IRRARetrievalModel.from_config(SMALL, fill=True, image_batch_size=8, text_batch_size=8,
                                               crop_text=False)
    assert np.allclose(one_batch.encode_images(images), img, atol=1e-5)
    assert np.allclose(one_batch.encode_texts(texts), txt, atol=1e-5)
    assert model.encode_images([]).shape == (0, 128) and model.encode_texts([]).shape == (0, 128)


def test_retrieval_adapter_precisions_and_random_init() -> None:
    texts = ["a woman in a red coat", "a man in a grey coat"]
    ref = IRRARetrievalModel.from_config(SMALL, fill=True).encode_texts(texts)
    for precision in ("bf16", "official"):
        model = IRRARetrievalModel.from_config(SMALL, fill=True, precision=precision)
        assert model.crop_text == (precision != "official")
        emb = model.encode_texts(texts)
        assert (np.sum(emb * ref, axis=1) > 0.99).all()
    a = IRRARetrievalModel.from_config(SMALL, seed=1)
    b = IRRARetrievalModel.from_config(SMALL, seed=1)
    assert a.version == "random-init"
    assert np.array_equal(a.encode_texts(texts), b.encode_texts(texts))
