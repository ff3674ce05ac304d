"""IVT: small-config shapes, modality routing, text masking, tokenizer, legacy checkpoints, adapter, metrics."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import RetrievalModel
from models.checkpoint import CheckpointMismatchError
from models.ivt import (
    CLS_TOKEN_ID,
    IVT,
    SERVICE_MAX_TEXT_TOKENS,
    IVTCheckpointError,
    IVTConfig,
    IVTRetrievalModel,
    checkpoint_filter_fn,
    config_from_state_dict,
    load_ivt_checkpoint,
    preprocess_image,
    tokenize_captions,
)
from models.parity import read_keys_tsv
from training.ivt_metrics import evaluate_ivt, official_ivt_metrics

PARITY_DIR = Path(__file__).parent / "parity" / "ivt"
SMALL_IMAGE = (64, 32)


def small_config(stride: int = 12, num_classes: int = 5) -> IVTConfig:
    # head width 64 as in ViT-B: a checkpoint does not record the head count, loading assumes 64-wide heads
    return IVTConfig(image_size=SMALL_IMAGE, stride=stride, embed_dim=128, depth=2, num_heads=2,
                     mlp_hidden_dim=256, vocab_size=30522, max_position_embeddings=24, num_classes=num_classes)


def small_model(stride: int = 12, seed: int = 0) -> IVT:
    torch.manual_seed(seed)
    model = IVT(small_config(stride)).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every path matters
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and tensor.ndim == 1:
                tensor.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def test_small_config_forward_shapes_and_grid() -> None:
    config = small_config(stride=12)
    assert config.grid == (5, 2) and config.num_image_tokens == 11
    assert small_config(stride=16).grid == (4, 2)
    model = small_model()
    assert model.encoder_vl.pos_embed.shape == (1, 11, 128) == model.encoder_vl.type_embed.shape
    out_vis, out_txt = model(torch.randn(3, 3, *SMALL_IMAGE), torch.randint(1, 200, (2, 7)),
                             torch.ones(2, 7, dtype=torch.long))
    assert out_vis.shape == (3, 128) and out_txt.shape == (2, 128)
    with pytest.raises(ValueError, match="expected images of size"):
        model.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="position table"):
        model.encode_text(torch.ones(1, 25, dtype=torch.long))


def test_state_dict_layout_matches_official_key_list() -> None:
    keys = read_keys_tsv(PARITY_DIR / "keys-stride12-cuhk.tsv")
    with torch.device("meta"):
        model = IVT(IVTConfig(stride=12, num_classes=11003))
    mine = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert mine == [(name, shape) for name, shape, _ in keys]  # same names, shapes and order
    assert model.state_dict()["encoder_vl.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.parametrize(("tsv", "stride", "num_classes"),
                         [("keys-stride12-cuhk.tsv", 12, 11003), ("keys-stride16-rstp.tsv", 16, 3701)])
def test_config_from_official_state_dict(tsv: str, stride: int, num_classes: int) -> None:
    state = {name: torch.empty(shape, device="meta") for name, shape, _ in read_keys_tsv(PARITY_DIR / tsv)}
    config = config_from_state_dict(state)
    assert (config.stride, config.num_classes, config.depth, config.embed_dim) == (stride, num_classes, 12, 768)
    with pytest.raises(ValueError, match="cannot tell the patch stride"):
        config_from_state_dict({**state, "encoder_vl.pos_embed": torch.empty(1, 100, 768, device="meta")})


def test_modality_experts_are_routed_by_modality() -> None:
    model = small_model()
    pixels, ids = torch.randn(2, 3, *SMALL_IMAGE), torch.randint(1, 200, (2, 6))
    image_before, text_before = model(pixels, ids)
    with torch.no_grad():
        for block in model.encoder_vl.blocks:
            block.mlp_vis.fc2.weight.mul_(-2.0)
    image_after, text_after = model(pixels, ids)
    assert torch.equal(text_before, text_after)  # text never touches mlp_vis
    assert not torch.allclose(image_before, image_after, atol=1e-3)
    with torch.no_grad():  # image-only embeddings (cls/pos/type) do not reach the text path
        model.encoder_vl.type_embed.add_(1.0)
    assert torch.equal(model.encode_text(ids), text_after)


def test_text_mask_makes_padding_invisible() -> None:
    model = small_model()
    ids = torch.tensor([[CLS_TOKEN_ID, 5, 17, 42]])
    alone = model.encode_text(ids, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.tensor([[7, 99, 3]])], dim=1)  # junk where the padding is
    padded_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    assert torch.allclose(model.encode_text(padded_ids, padded_mask), alone, atol=1e-5)
    assert not torch.allclose(model.encode_text(padded_ids, torch.ones_like(padded_ids)), alone, atol=1e-3)


def test_tokenizer_is_cls_without_sep_and_untruncated() -> None:
    long_caption = " ".join(["red"] * 150)
    ids, mask = tokenize_captions(["A man in black.", long_caption])
    assert ids.shape == (2, 151) and ids[0, 0] == ids[1, 0] == CLS_TOKEN_ID
    assert 102 not in ids.tolist()[0] and 102 not in ids.tolist()[1]  # never [SEP]
    assert mask[0].tolist() == [1] * 6 + [0] * 145 and ids[0, 6:].eq(0).all()  # [CLS] a man in black .
    capped, capped_mask = tokenize_captions([long_caption, "a man"], max_tokens=10)
    assert capped.shape == (2, 10) and capped[0].tolist() == ids[1, :10].tolist()
    assert capped_mask[1].tolist() == [1, 1, 1] + [0] * 7
    for case in ("encode_stride12", "encode_stride16"):  # the ids the official tokenizer gave
        inputs = json.loads((PARITY_DIR / case / "case.json").read_text())["inputs"]
        mine, _ = tokenize_captions(inputs["text"]["value"])
        assert mine.tolist() == inputs["input_ids"]["value"]


def _official_style_file(path: Path, model: IVT, prefix: str = "module.") -> None:
    """What the official ``save_checkpoint`` writes: legacy format, DDP prefix, numpy scalar inside."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    momentum = {i: {"momentum_buffer": torch.zeros(2)} for i in range(3)}
    checkpoint = {"state_dict": state, "optimizer": {"state": momentum, "param_groups": [{"lr": 0.005}]},
                  "epoch": 31, "best_acc": np.float64(0.6123)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("stride", [12, 16])
def test_legacy_official_file_loads_strictly_with_weights_only(tmp_path: Path, stride: int) -> None:
    source = small_model(stride, seed=3)
    path = tmp_path / "checkpoint_best.pth"
    _official_style_file(path, source)
    assert not zipfile.is_zipfile(path)  # really the legacy format
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        torch.load(path, weights_only=True)  # the numpy scalar needs the explicit allow-list
    loaded = load_ivt_checkpoint(path, image_size=SMALL_IMAGE)
    assert loaded.config.stride == stride and loaded.config.num_classes == 5 and not loaded.training
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixels, ids = torch.randn(1, 3, *SMALL_IMAGE), torch.randint(1, 200, (1, 5))
    assert all(torch.equal(a, b) for a, b in zip(loaded(pixels, ids), source(pixels, ids), strict=True))


def test_filter_fn_strips_prefix_and_accepts_a_bare_state_dict() -> None:
    state = small_model().state_dict()
    prefixed = checkpoint_filter_fn({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 1})
    assert list(prefixed) == list(state)
    assert list(checkpoint_filter_fn(state)) == list(state)


def test_wrong_files_give_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(IVTCheckpointError, match="junk.pth is not a readable IVT checkpoint"):
        load_ivt_checkpoint(junk)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(IVTCheckpointError, match="not an IVT state_dict"):
        load_ivt_checkpoint(other)
    no_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], no_dict)
    with pytest.raises(IVTCheckpointError, match="no IVT state_dict"):
        load_ivt_checkpoint(no_dict)
    state = {k: v for k, v in small_model().state_dict().items() if not k.startswith("encoder_vl.blocks.1.mlp_txt")}
    state["extra_head.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(CheckpointMismatchError, match="missing keys: encoder_vl.blocks.1.mlp_txt") as info:
        load_ivt_checkpoint(broken, image_size=SMALL_IMAGE)
    assert "extra_head.weight" in str(info.value)


def test_retrieval_adapter_contract_and_precisions(tmp_path: Path) -> None:
    adapter = IVTRetrievalModel.from_config(small_config(), seed=1, batch_size=2)
    assert isinstance(adapter, RetrievalModel) and adapter.method == "ivt" and adapter.embed_dim == 128
    rng = np.random.default_rng(0)
    sizes = [(90, 40), (50, 70), (64, 32)]  # (height, width): down- and up-scaled, and already the right size
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    image_feats = adapter.encode_images(images)
    assert image_feats.shape == (3, 128) and image_feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(image_feats, axis=1), 1.0, atol=1e-5)
    texts = ["a man", "a woman with a long red coat and a bag", "child", "the person wears shoes"]
    text_feats = adapter.encode_texts(texts)
    assert text_feats.shape == (4, 128) and np.allclose(np.linalg.norm(text_feats, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([adapter.encode_texts([t]) for t in texts])
    assert np.allclose(text_feats, one_by_one, atol=1e-5)  # length-sorted batching puts rows back in place
    assert adapter.encode_texts([]).shape == (0, 128)
    assert adapter.max_text_tokens == 24 <= SERVICE_MAX_TEXT_TOKENS  # capped by the position table
    assert adapter.encode_texts(["word " * 60]).shape == (1, 128)  # over-long query is capped, not a crash

    bf16 = IVTRetrievalModel.from_config(small_config(), precision="bf16", seed=1)
    bf16_feats = bf16.encode_images(images)
    assert bf16.model.encoder_vl.blocks[0].mlp_vis.fc1.weight.dtype == torch.bfloat16
    assert (bf16_feats * image_feats).sum(axis=1).min() > 0.98
    pixels = torch.stack([preprocess_image(img, SMALL_IMAGE) for img in images])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_autocast = torch.nn.functional.normalize(adapter.model.encode_image(pixels).float(), dim=-1)
    assert np.array_equal(bf16_feats, plain_autocast.numpy())  # weights cast once == autocast per call
    with pytest.raises(ValueError, match="precision 'fp16'"):
        IVTRetrievalModel.from_config(small_config(), precision="fp16")

    path = tmp_path / "ivt.pth"
    _official_style_file(path, adapter.model)
    with pytest.raises(IVTCheckpointError, match="pos_embed has 11 tokens, which no stride gives"):
        IVTRetrievalModel.from_checkpoint(path)  # trained for 64x32, asked for the official 384x128
    reloaded = IVTRetrievalModel.from_checkpoint(path, image_size=SMALL_IMAGE)
    assert reloaded.version.startswith("ivt-s12-") and reloaded.version != adapter.version
    assert np.allclose(reloaded.encode_images(images), image_feats, atol=1e-6)  # other batch split
    ours = tmp_path / "ours.pth"  # our recipe's export: official layout plus the image size, fp16 weights
    half = {k: v.half() if v.is_floating_point() else v for k, v in adapter.model.state_dict().items()}
    torch.save({"state_dict": half, "epoch": 3, "image_size": list(SMALL_IMAGE)}, ours)
    from_file = IVTRetrievalModel.from_checkpoint(ours)
    assert from_file.config.image_size == SMALL_IMAGE
    assert np.allclose(from_file.encode_images(images), image_feats, atol=2e-2)


def test_official_metrics_paired_gallery() -> None:
    # Caption-level rows: image A (pid 0) and image B (pid 1), each listed twice. Only rows 0 and 2 form the
    # gallery; rows 1 and 3 are junk that would change the result if they were used.
    image_feats = np.array([[1.0, 0.0], [9.0, 9.0], [0.0, 1.0], [-9.0, 9.0]], np.float32)
    text_feats = np.array([[1.0, 0.1], [0.1, 1.0], [0.2, 1.0], [1.0, 0.0]], np.float32)
    metrics = official_ivt_metrics(image_feats, text_feats, [0, 0, 1, 1], paired_gallery=True)
    assert (metrics.num_gallery, metrics.num_queries) == (2, 4)
    assert metrics.cmc.tolist() == [0.5, 1.0] and metrics.r1 == 0.5 and metrics.r5 == 1.0
    # one good row per query, at ranks 0, 1, 0, 1; at rank 1: (old 0/1 + precision 1/2) / 2 = 0.25
    assert metrics.mAP == pytest.approx((1.0 + 0.25 + 1.0 + 0.25) / 4)
    assert official_ivt_metrics(image_feats, text_feats, [0, 0, 1, 1], paired_gallery=False).num_gallery == 4


def test_official_metrics_trapezoidal_ap_differs_from_standard_ap() -> None:
    feats = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    metrics = official_ivt_metrics(feats, feats, [0, 1, 0], paired_gallery=False)
    # queries 0 and 2 find their two pid-0 rows at ranks 0 and 2:
    # trapezoid (1/2)(1+1)/2 + (1/2)(1/2 + 2/3)/2 = 0.7917, where standard AP would be (1 + 2/3)/2 = 0.8333
    trapezoid = 0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert metrics.mAP == pytest.approx((2 * trapezoid + 1.0) / 3)
    assert metrics.r1 == 1.0
    standard = evaluate_ivt(feats, feats, [0, 1, 0], image_ids=["x", "y", "z"])
    assert standard.protocol == "standard-unique-gallery"
    assert standard.mAP == pytest.approx((2 * (1 + 2 / 3) / 2 + 1.0) / 3)
    assert standard.mINP == pytest.approx((2 * (2 / 3) + 1.0) / 3)  # num_rel / rank of the last hit


def test_standard_protocol_uses_unique_images_whatever_the_order() -> None:
    image_a, image_b = [1.0, 0.0], [0.0, 1.0]
    # Captions of A and B alternate, so the official [::2] gallery would hold A twice and never B.
    image_feats = np.array([image_a, image_b, image_a, image_b], np.float32)
    text_feats = np.array([[1.0, 0.1], [0.1, 1.0], [0.9, 0.2], [0.3, 1.0]], np.float32)
    pids, image_ids = [0, 1, 0, 1], ["a.jpg", "b.jpg", "a.jpg", "b.jpg"]
    standard = evaluate_ivt(image_feats, text_feats, pids, image_ids)
    assert standard.num_gallery == 2 and standard.r1 == 1.0 and standard.mAP == pytest.approx(1.0)
    official = evaluate_ivt(image_feats, text_feats, pids, official=True, paired_gallery=True)
    assert official.num_gallery == 2 and official.r1 == 0.5 and official.mAP == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs image_ids"):
        evaluate_ivt(image_feats, text_feats, pids)
