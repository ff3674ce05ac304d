"""LAPS: vectorised scorer == per-pair loop, paper variant trains, official-layout files load strictly and fill
every backbone weight, adapter surface, metrics, evaluation CLI. Small configs except the key-list checks."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import laps_scoring
from models.checkpoint import CheckpointMismatchError, load_checkpoint_file
from models.laps import (
    LapsConfig,
    LapsModel,
    LapsSearchModel,
    build_official_state_dict,
    checkpoint_filter_fn,
    load_laps_checkpoint,
    load_official_state_dict,
    save_official_checkpoint,
    to_official_state_dict,
    tokenize_caption,
)
from models.laps_scoring import (
    DeltaImageFactors,
    LapsCaptionState,
    LapsImageState,
    _caption_chunks,
    delta_selection,
    score_block,
    score_block_delta,
    score_matrix,
    score_matrix_reference,
)
from models.parity import crc32_normal_fill, read_keys_tsv
from training.laps_metrics import contrastive_loss, evaluate_sims, laps_training_loss

KEYS_DIR = Path(__file__).parent / "parity" / "laps"
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}
SMALL_VIT = LapsConfig(backbone="vit", embed_size=24, sparse_ratio=0.5, aggr_ratio=0.4, text=TINY_TEXT,
                       vision={"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "intermediate_size": 64})
SMALL_SWIN = LapsConfig(backbone="swin", embed_size=20, sparse_ratio=0.8, aggr_ratio=0.6, text=TINY_TEXT,
                        vision={"image_size": 32, "patch_size": 4, "embed_dim": 8, "depths": [1, 1],
                                "num_heads": [1, 2], "window_size": 4})
CAPTIONS = ["a dog runs on the grass .", "two people ride bikes down a hill", "sunset",
            "a man in a red shirt holds a large fish next to a boat"]


def _fill_random(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if torch.is_floating_point(tensor):
                scale = 0.5 if tensor.dim() > 1 else 0.1
                noise = torch.randn(tensor.shape, generator=generator) * scale
                tensor.data.copy_(noise + (1.0 if name.endswith(("weight", "scale")) and tensor.dim() <= 1 else 0.0))


def _images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def _random_states(num_img: int, num_cap: int, n: int, c: int, nc: int, cls: bool, seed: int,
                   max_len: int = 95) -> tuple[LapsImageState, LapsCaptionState, torch.nn.Module]:
    """Synthetic features with a shared direction (as trained features have) and ragged captions (some > 90)."""
    from models.laps import TokenAggregation

    torch.manual_seed(seed)
    agg = TokenAggregation(c, nc)
    _fill_random(agg, seed)
    common = torch.randn(c)
    patches = torch.randn(num_img, n, c) + 0.7 * common
    with torch.no_grad():
        images = LapsImageState(patches=patches, cls=torch.randn(num_img, c) if cls else None,
                                aggr_logits=agg.logits(patches))
    lengths = torch.randint(2, max_len + 1, (num_cap,))
    lengths[0] = max_len
    captions = LapsCaptionState.from_embeddings(torch.randn(num_cap, max_len, c) + 0.5 * common, lengths)
    return images, captions, agg


# --------------------------------------------------------------------------------------------- config


def test_released_config_sizes() -> None:
    vit, swin = LapsConfig.released("vit"), LapsConfig.released("swin")
    assert (vit.num_patches, vit.keep_k, vit.num_aggregated) == (196, 98, 39)
    assert (swin.num_patches, swin.keep_k, swin.num_aggregated) == (49, 40, 23)  # ceil(39.2), int(23.52)
    opt = argparse.Namespace(vit_type="swin_base", embed_size=1024, sparse_ratio=0.8, aggr_ratio=0.6)
    cfg = LapsConfig.from_options(opt)
    assert cfg.backbone == "swin" and cfg.embed_size == 1024 and cfg.max_word == 90


def test_identity_projections_when_widths_match() -> None:
    cfg = LapsConfig(backbone="vit", embed_size=32, text=TINY_TEXT, vision=dict(SMALL_VIT.vision))
    keys = LapsModel(cfg).state_dict()
    assert not any(k.startswith(("img_enc.vision_proj", "txt_enc.fc")) for k in keys)
    assert "img_enc.vision_proj.weight" in LapsModel(SMALL_VIT).state_dict()


# --------------------------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("n,nc,keep_k,cls", [(16, 3, 8, True), (49, 23, 40, False)])
def test_vectorised_scores_equal_per_pair_loop(n: int, nc: int, keep_k: int, cls: bool) -> None:
    images, captions, agg = _random_states(5, 13, n, 32, nc, cls, seed=n)
    loop = score_matrix_reference(images, captions, keep_k, agg.weight, agg.scale)
    # tiny chunks: several image and caption blocks, captions visited in length order
    chunked = score_matrix(images, captions, keep_k, max_chunk_bytes=60_000, image_chunk=2)
    whole = score_block(images, captions, keep_k).scores
    assert torch.isfinite(loop).all() and loop.std() > 1e-3
    assert torch.allclose(chunked, loop, atol=1e-5, rtol=0)
    assert torch.allclose(whole, loop, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,c,nc,keep_k,cls,batch", [
    (16, 32, 3, 8, True, 8), (16, 32, 3, 8, True, 2), (49, 32, 23, 40, False, 4),
    (16, 8, 5, 7, True, 3),  # fewer channels than patches: the Gram matrix is rank-deficient
])
def test_delta_block_equals_per_pair_loop(n: int, c: int, nc: int, keep_k: int, cls: bool, batch: int) -> None:
    images, captions, agg = _random_states(4, 9, n, c, nc, cls, seed=n + c)
    loop = score_matrix_reference(images, captions, keep_k, agg.weight, agg.scale)
    factors = DeltaImageFactors.build(images, keep_k)
    selected = delta_selection(images, captions.global_norm, keep_k, factors)
    assert int(selected.delta_count.max()) > 0  # the captions do move patches across the K-th place
    got = score_block_delta(images, captions, keep_k, factors=factors, selected=selected, caption_batch=batch)
    assert torch.isfinite(loop).all() and loop.std() > 1e-3
    assert torch.allclose(got, loop, atol=1e-5, rtol=0)


def test_delta_block_with_no_difference_and_with_everything_different() -> None:
    """K = N keeps every patch for every caption (no pair differs from the base set); a base set built for another
    K makes every pair differ from it in many patches: both give the per-pair loop's scores."""
    images, captions, agg = _random_states(3, 6, 16, 16, 3, True, seed=3)
    loop_all = score_matrix_reference(images, captions, 16, agg.weight, agg.scale)
    selected = delta_selection(images, captions.global_norm, 16, DeltaImageFactors.build(images, 16))
    assert int(selected.delta_count.max()) == 0
    assert torch.allclose(score_block_delta(images, captions, 16), loop_all, atol=1e-5, rtol=0)
    loop = score_matrix_reference(images, captions, 12, agg.weight, agg.scale)
    far_base = DeltaImageFactors.build(images, 2)
    selected = delta_selection(images, captions.global_norm, 12, far_base)
    assert int(selected.delta_count.min()) >= 10
    got = score_block_delta(images, captions, 12, factors=far_base, selected=selected)
    assert torch.allclose(got, loop, atol=1e-5, rtol=0)


@pytest.mark.parametrize("margin", [0.0, 10.0])
def test_delta_selection_float64_fallback(margin: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Margin 0 decides every pair from float32 scores, margin 10 re-decides every pair in float64: the kept sets
    (hence the scores) agree with the float64 top-K of the per-pair loop either way on these inputs."""
    monkeypatch.setattr(laps_scoring, "SELECTION_MARGIN", margin)
    images, captions, agg = _random_states(3, 7, 49, 16, 23, False, seed=11)
    loop = score_matrix_reference(images, captions, 40, agg.weight, agg.scale)
    assert torch.allclose(score_block_delta(images, captions, 40), loop, atol=1e-5, rtol=0)


def test_delta_float32_near_ties_follow_float64() -> None:
    """Two patches whose float64 selection scores differ by 1e-9 (far below float32 resolution) at the K-th
    place: the float64 re-decision keeps the one the per-pair loop keeps."""
    images, captions, agg = _random_states(1, 1, 16, 16, 3, False, seed=5, max_len=6)
    scores = (images.self_score[0] + images.patches_norm[0].double() @ captions.global_norm[0].double())
    order = torch.argsort(scores, descending=True)
    kth, next_one = int(order[7]), int(order[8])
    # shift patch `next_one`'s image self-score so it sits 1e-9 above patch `kth`
    self_score = images.self_score.clone()
    self_score[0, next_one] += float(scores[kth] - scores[next_one]) + 1e-9
    tied = LapsImageState(patches=images.patches, cls=None, aggr_logits=images.aggr_logits,
                          patches_norm=images.patches_norm, self_score=self_score)
    loop = score_matrix_reference(tied, captions, 8, agg.weight, agg.scale)
    got = score_block_delta(tied, captions, 8)
    assert torch.allclose(got, loop, atol=1e-5, rtol=0)


def test_score_matrix_workers_match_and_restore_threads() -> None:
    images, captions, _ = _random_states(7, 11, 16, 32, 3, True, seed=21)
    threads = torch.get_num_threads()
    serial = score_matrix(images, captions, 8, image_chunk=2)
    threaded = score_matrix(images, captions, 8, image_chunk=2, workers=2)
    assert torch.allclose(serial, threaded, atol=1e-6, rtol=0)
    assert torch.get_num_threads() == threads


def test_caption_chunks_bound_padded_words() -> None:
    lengths = [3, 3, 4, 5, 5, 6, 20, 90]
    runs = _caption_chunks(lengths, 16)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
    for start, end in runs:
        assert (end - start) * lengths[end - 1] <= 16 or end - start == 1
    assert runs[-1] == (7, 8)  # the 90-word caption alone


def test_extreme_aggregation_logits_use_exact_softmax() -> None:
    images, captions, agg = _random_states(3, 6, 16, 16, 3, True, seed=3, max_len=12)
    with torch.no_grad():
        agg.scale.fill_(400.0)  # logit ranges far beyond exp's float32 range
        images = LapsImageState(patches=images.patches, cls=images.cls, aggr_logits=agg.logits(images.patches))
    assert float(images.aggr_logits.amax(1).sub(images.aggr_logits.amin(1)).max()) > 100
    loop = score_matrix_reference(images, captions, 8, agg.weight, agg.scale)
    assert torch.allclose(score_matrix(images, captions, 8), loop, atol=1e-5, rtol=0)


def test_keep_mask_and_caption_cap() -> None:
    images, captions, _ = _random_states(4, 5, 49, 16, 23, False, seed=5)
    result = score_block(images, captions, 40, return_keep=True)
    assert result.keep.shape == (4, 5, 49)
    assert torch.all(result.keep.sum(-1) == 40) and set(result.keep.unique().tolist()) <= {0.0, 1.0}
    assert int(captions.lengths.max()) == 90  # a 95-token caption keeps its first 90 word features


def test_score_is_sum_of_both_mean_of_max_terms() -> None:
    """With one patch kept and one dropped, tokens are the patches themselves: check the formula by hand."""
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    agg_logits = torch.zeros(1, 2, 1)
    images = LapsImageState(patches=p, cls=None, aggr_logits=agg_logits)
    words = torch.tensor([[[1.0, 0.2], [-1.0, -0.1]]])
    captions = LapsCaptionState.from_embeddings(words, [2])
    got = float(score_block(images, captions, keep_k=1).scores)
    w = torch.nn.functional.normalize(words[0], dim=-1)
    a = torch.nn.functional.leaky_relu(w @ p[0].T, 0.1)  # both tokens are the unit patches
    expected = float(a.max(1).values.mean() + a.max(0).values.mean())
    assert math.isclose(got, expected, abs_tol=1e-6)


def test_image_state_bytes_round_trip() -> None:
    images, captions, _ = _random_states(3, 4, 16, 16, 3, True, seed=7, max_len=10)
    blobs = [images.to_bytes(i) for i in range(len(images))]
    restored = LapsImageState.from_bytes(blobs)
    assert torch.equal(score_matrix(restored, captions, 8), score_matrix(images, captions, 8))
    with pytest.raises(ValueError):
        LapsImageState.from_bytes(b"not a state")
    # a blob without the version entry (the service's first format) holds the same arrays and still loads
    legacy = io.BytesIO()
    np.savez(legacy, **images.to_arrays(0))
    assert torch.equal(LapsImageState.from_bytes(legacy.getvalue()).patches, images.patches[:1])


# --------------------------------------------------------------------------------------------- paper variant


def test_paper_variant_trains_and_leaves_official_layout_alone() -> None:
    paper_cfg = LapsConfig(**{**SMALL_VIT.__dict__, "selection": "paper"})
    official_keys = set(LapsModel(SMALL_VIT).state_dict())
    torch.manual_seed(0)
    model = LapsModel(paper_cfg)
    extra = set(model.state_dict()) - official_keys
    assert extra and all(k.startswith("cross_net.score_net.") for k in extra)
    assert official_keys <= set(model.state_dict())

    from models.laps import pad_token_ids, preprocess_images

    pixels = preprocess_images(_images(3), 32)
    ids, lengths = pad_token_ids([tokenize_caption(c) for c in CAPTIONS[:3]])
    model.train()
    sims, keep = model(pixels, ids, lengths)
    assert sims.shape == (3, 3) and keep.shape == (3, 3, 16)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}  # straight-through: hard forward
    loss, parts = laps_training_loss(sims, keep, torch.arange(3), paper_cfg.sparse_ratio)
    loss.backward()
    assert parts["ratio"] > 0.0
    for prefix in ("cross_net.score_net.", "cross_net.aggr_net.", "img_enc.visual_encoder.", "txt_enc.bert."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), prefix

    model.eval()  # inference: hard argmax decisions, deterministic, same as the paper per-pair loop
    with torch.no_grad():
        img_embs, cap_embs = model.forward_emb(pixels, ids)
        images = model.cross_net.image_states(img_embs)
        captions = model.cross_net.caption_states(cap_embs, lengths)
        a = model.score(images, captions)
        loop = score_matrix_reference(images, captions, model.cross_net.keep_k, model.cross_net.aggr_net.weight,
                                      model.cross_net.aggr_net.scale, "paper", model.cross_net.paper)
    assert torch.allclose(a, loop, atol=1e-5, rtol=0)
    assert torch.equal(a, model.score(images, captions))


def test_official_selection_ratio_loss_is_constant() -> None:
    torch.manual_seed(1)
    model = LapsModel(SMALL_SWIN).train()
    from models.laps import pad_token_ids, preprocess_images

    sims, keep = model(preprocess_images(_images(2), 32), *pad_token_ids([tokenize_caption(c) for c in CAPTIONS[:2]]))
    _, parts = laps_training_loss(sims, keep, torch.arange(2), SMALL_SWIN.sparse_ratio)
    assert math.isclose(parts["ratio"], (13 / 16 - 0.8) ** 2, rel_tol=1e-5)
    assert not keep.requires_grad


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("config", [SMALL_VIT, SMALL_SWIN], ids=["vit", "swin"])
def test_official_layout_file_loads_strictly(tmp_path: Path, config: LapsConfig) -> None:
    torch.manual_seed(2)
    model = LapsModel(config).eval()
    _fill_random(model, 3)
    path = tmp_path / "model_best.pth"
    save_official_checkpoint(model, path, epoch=7, best_rsum=500.5)
    raw = load_checkpoint_file(path)  # weights_only=True with the Namespace allow-listed
    assert isinstance(raw["opt"], argparse.Namespace) and raw["epoch"] == 7
    names = set(raw["model"])
    if config.backbone == "vit":
        assert "img_enc.visual_encoder.encoder.layer.0.attention.attention.query.weight" in names
    else:
        assert "img_enc.visual_encoder.encoder.layers.0.blocks.0.attention.self.relative_position_index" in names
    assert not any("q_proj" in n or "mlp.fc1" in n for n in names)  # transformers-4.x names only

    loaded, info = load_laps_checkpoint(path)
    assert info["best_rsum"] == 500.5 and loaded.config.backbone == config.backbone
    from models.laps import pad_token_ids, preprocess_images

    pixels = preprocess_images(_images(2), 32)
    ids, lengths = pad_token_ids([tokenize_caption(c) for c in CAPTIONS])
    with torch.no_grad():
        assert torch.equal(model(pixels, ids, lengths), loaded(pixels, ids, lengths))

    # a DataParallel prefix and a pre-4.31 BERT position_ids buffer are mechanical and accepted
    prefixed = {f"module.{k}": v for k, v in raw["model"].items()}
    prefixed["module.txt_enc.bert.embeddings.position_ids"] = torch.arange(128)[None]
    load_official_state_dict(LapsModel(config), prefixed)
    # anything else is named
    broken = dict(raw["model"])
    missing = next(k for k in broken if k.startswith("img_enc.visual_encoder.") and k.endswith("bias"))
    del broken[missing]
    broken["cross_net.unknown.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_state_dict(LapsModel(config), broken)
    assert "cross_net.unknown.weight" in str(err.value)


def test_filter_rejects_foreign_swin_index() -> None:
    model = LapsModel(SMALL_SWIN)
    state = to_official_state_dict(model)
    key = next(k for k in state if k.endswith("relative_position_index"))
    state[key] = torch.zeros_like(state[key])
    with pytest.raises(ValueError, match="window layout"):
        checkpoint_filter_fn(state, model)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_official_key_list_fills_every_backbone_weight(backbone: str) -> None:
    """Fill the official key list (transformers-4.x names) by the parity rule, load it through the filter, and
    check that every entry of the model (5.x names) holds the value of its official name. Full-size image side;
    BERT is tiny here (its names are not renamed) and checked by name only."""
    keys = read_keys_tsv(KEYS_DIR / f"keys-{backbone}.tsv")
    config = LapsConfig(**{**LapsConfig.released(backbone).__dict__, "text": TINY_TEXT})
    model = LapsModel(config)
    image_keys = [k for k in keys if not k[0].startswith("txt_enc.")]
    own = to_official_state_dict(model)
    official_text_names = {k[0] for k in keys if k[0].startswith("txt_enc.")}
    assert {n for n in own if n.startswith("txt_enc.")} <= official_text_names
    assert {(n, tuple(v.shape)) for n, v in own.items() if not n.startswith("txt_enc.")} == {
        (n, s) for n, s, _ in image_keys}
    filled = build_official_state_dict(model, image_keys, crc32_normal_fill)
    filled.update({n: v for n, v in own.items() if n.startswith("txt_enc.")})
    before = {n: v.clone() for n, v in model.state_dict().items() if n.startswith("img_enc.")}
    load_official_state_dict(model, filled)
    after = to_official_state_dict(model)
    assert len(after) == len(own)
    for name, _shape, dtype in image_keys:
        assert torch.equal(after[name], filled[name]), name
        if dtype.startswith("float"):
            assert torch.equal(after[name], torch.from_numpy(crc32_normal_fill(name, after[name].shape)))
    changed = [n for n, v in model.state_dict().items() if n in before and not torch.equal(v, before[n])]
    assert len(changed) == len(before)  # every image-side entry of the 5.x model was overwritten


# --------------------------------------------------------------------------------------------- adapter


def test_search_adapter_surface() -> None:
    search = LapsSearchModel.from_config(SMALL_VIT, seed=4)
    _fill_random(search.model, 5)
    images = _images(4)
    vectors = search.encode_images(images)
    texts = search.encode_texts(CAPTIONS)
    assert vectors.shape == (4, search.embed_dim) and texts.shape == (4, 24) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert search.method == "laps" and search.version.startswith("laps-vit")

    img_states = search.image_states(images)
    cap_states = search.caption_states(CAPTIONS + [" ".join(["word"] * 100)])
    assert int(cap_states.lengths[-1]) == 90
    blobs = search.image_state_bytes(images)
    stored = LapsImageState.cat([search.state_from_bytes(b) for b in blobs])
    scores = search.exact_scores(stored, cap_states)
    vectors_again, blobs_again = search.encode_images_with_states(images)
    assert np.array_equal(vectors_again, vectors) and blobs_again == blobs
    agg = search.model.cross_net.aggr_net
    loop = score_matrix_reference(img_states, cap_states, search.config.keep_k, agg.weight, agg.scale)
    assert scores.shape == (4, 5) and np.allclose(scores, loop.numpy(), atol=1e-5)
    # the long caption's words are BERT features of the full caption, cut after encoding
    ids = torch.tensor([tokenize_caption(" ".join(["word"] * 100))])
    with torch.no_grad():
        full = torch.nn.functional.normalize(search.model.txt_enc(ids)[0, :90], dim=-1)
    assert torch.allclose(cap_states.words_norm[-1, :90], full, atol=1e-6)

    bf16 = LapsSearchModel(search.model, precision="bf16")
    assert np.allclose(bf16.encode_images(images[:2]), vectors[:2], atol=0.1)


def test_tokenizer_matches_official_ids() -> None:
    assert tokenize_caption("A man, wearing a RED shirt; rides his BIKE!!") == [
        101, 1037, 2158, 1010, 4147, 1037, 2417, 3797, 1025, 12271, 2010, 7997, 999, 999, 102]


# --------------------------------------------------------------------------------------------- metrics / CLI


def test_metrics_and_loss_behaviour() -> None:
    sims = np.zeros((4, 20), dtype=np.float32)
    for i in range(4):
        sims[i, 5 * i: 5 * i + 5] = 1.0 + np.arange(5) * 0.01
    metrics = evaluate_sims(sims)
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 100.0 and metrics["rsum"] == 600.0
    scores = torch.tensor([[1.0, 5.0], [5.0, 1.0]])
    assert float(contrastive_loss(scores, torch.tensor([0, 0]))) == 0.0  # same image: masked
    assert float(contrastive_loss(scores, torch.tensor([0, 1]))) > 0.0


def test_eval_cli_on_a_tiny_split(tmp_path: Path) -> None:
    from training.eval_laps import main

    torch.manual_seed(6)
    model = LapsModel(SMALL_SWIN)
    save_official_checkpoint(model, tmp_path / "model_best.pth")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    mapping, ids, caps = {}, [], []
    for i, img in enumerate(_images(5)):
        img.save(image_dir / f"{1000 + i}.png")
        mapping[str(i)] = f"{1000 + i}.png"
        ids += [i] * 5  # test splits list each image id once per caption
        caps += [f"caption {k} of picture {i}" for k in range(5)]
    (tmp_path / "test_caps.txt").write_text("\n".join(caps) + "\n")
    (tmp_path / "test_ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    (tmp_path / "id_mapping.json").write_text(json.dumps(mapping))
    out = tmp_path / "metrics.json"
    results = main(["--checkpoint", str(tmp_path / "model_best.pth"), "--data-dir", str(tmp_path), "--image-root",
                    str(image_dir), "--split", "test", "--protocol", "single", "coco-5fold", "--fold-images", "1",
                    "--device", "cpu", "--output", str(out)])
    assert set(results) >= {"single", "coco-5fold"}
    assert results["coco-5fold"]["i2t_r1"] == 100.0  # one image per fold
    assert 0.0 <= results["single"]["rsum"] <= 600.0
    assert json.loads(out.read_text())["single"] == results["single"]
