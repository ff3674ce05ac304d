"""Loading official-layout IRRA files: ``{'model', 'optimizer', 'scheduler', ...}``, fp16/fp32 entries,
optional ``module.`` prefix, ``weights_only=True``, strict keys with clear errors."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointMismatchError
from models.irra import (
    IRRA,
    IRRAConfig,
    IRRARetrievalModel,
    apply_precision,
    checkpoint_filter_fn,
    config_from_state_dict,
    load_irra_checkpoint,
)
from models.parity import fill_module

SMALL = IRRAConfig(embed_dim=128, image_size=(64, 32), vision_width=128, vision_layers=2, vision_heads=2,
                   text_width=128, text_layers=2, text_heads=2, cmt_depth=1, cross_heads=2, num_classes=7)
TEXT = torch.tensor([[49406, 320, 2308, 593, 49407] + [0] * 72, [49406, 786, 49407] + [0] * 74])


def _official_model(config: IRRAConfig = SMALL) -> IRRA:
    """A model in the state ``build_model`` leaves it in: filled, then ``convert_weights`` (fp16/fp32 mix)."""
    model = IRRA(config).eval()
    fill_module(model)
    return apply_precision(model, "official")


def _official_checkpoint(model: IRRA) -> dict:
    """What the official ``Checkpointer.save('best', ...)`` writes: model, Adam state, scheduler, epochs."""
    trained = copy.deepcopy(model)  # one Adam step on a copy gives a real optimizer state (exp_avg, ...)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-5, eps=1e-3, weight_decay=4e-5)
    for param in trained.parameters():
        param.grad = torch.full_like(param, 1e-3)
    optimizer.step()
    scheduler = {"milestones": (20, 50), "gamma": 0.1, "warmup_factor": 0.1, "warmup_epochs": 5,
                 "warmup_method": "linear", "total_epochs": 60, "mode": "cosine", "target_lr": 0,
                 "power": 0.9, "base_lrs": [1e-5, 2e-5], "last_epoch": 36, "_step_count": 37,
                 "verbose": False, "_get_lr_called_within_step": False, "_last_lr": [6e-6, 1.2e-5]}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler,
            "num_epoch": 60, "iteration": 0, "epoch": 37}


@pytest.fixture(scope="module")
def official() -> IRRA:
    return _official_model()


@pytest.fixture(scope="module")
def official_files(official: IRRA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same checkpoint saved as single-GPU training writes it, and with DataParallel's ``module.``."""
    folder = tmp_path_factory.mktemp("irra")
    checkpoint = _official_checkpoint(official)
    torch.save(checkpoint, folder / "best.pth")
    checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, folder / "best_dp.pth")
    return {"plain": folder / "best.pth", "prefixed": folder / "best_dp.pth"}


@pytest.fixture(scope="module")
def official_path(official_files: dict[str, Path]) -> Path:
    return official_files["plain"]


def test_file_holds_the_official_dtype_mix(official_path: Path) -> None:
    state = torch.load(official_path, map_location="cpu", weights_only=True)["model"]
    assert state["base_model.visual.conv1.weight"].dtype == torch.float16
    assert state["base_model.text_projection"].dtype == torch.float16
    assert state["base_model.ln_final.weight"].dtype == torch.float32
    assert state["base_model.token_embedding.weight"].dtype == torch.float32


@pytest.mark.parametrize("variant", ["plain", "prefixed"])
def test_load_official_file_strictly(official: IRRA, official_files: dict[str, Path], variant: str) -> None:
    model = load_irra_checkpoint(official_files[variant], base_config=SMALL)
    assert model.config == SMALL
    source = official.state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32  # loaded widened; fp16 entries are exact in float32
        assert torch.equal(value, source[name].float()), name
    with torch.no_grad():
        ref = official.encode_text(TEXT)
        apply_precision(model, "official")
        assert torch.equal(model.encode_text(TEXT), ref)  # same dtype placement -> identical numbers


def test_config_is_read_off_the_shapes(tmp_path: Path) -> None:
    # an RSTPReid-like head count, another vocabulary and another grid (same 2:1 aspect) than SMALL's
    config = IRRAConfig(**{**SMALL.to_dict(), "num_classes": 11, "image_size": (96, 48), "cmt_depth": 2,
                           "vocab_size": 300})
    torch.save({"model": _official_model(config).state_dict()}, tmp_path / "other.pth")
    model = load_irra_checkpoint(tmp_path / "other.pth", base_config=SMALL)
    assert model.config == config and model.config.grid == (6, 3)
    sdm_only = IRRA(IRRAConfig(**{**SMALL.to_dict(), "loss_names": "sdm", "vocab_size": 300}))
    assert config_from_state_dict(sdm_only.state_dict(), base=SMALL).loss_names == "sdm"
    odd_grid = {"base_model.visual.positional_embedding": torch.zeros(1 + 7, 128)}
    with pytest.raises(ValueError, match="patch positions"):
        config_from_state_dict(odd_grid, base=SMALL)


def _rewrite(path: Path, out: Path, change) -> Path:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    change(checkpoint["model"])
    torch.save(checkpoint, out)
    return out


def test_missing_key_is_named(official_path: Path, tmp_path: Path) -> None:
    path = _rewrite(official_path, tmp_path / "missing.pth",
                    lambda sd: sd.pop("base_model.transformer.resblocks.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: base_model\.transformer\.resbl"):
        load_irra_checkpoint(path, base_config=SMALL)


def test_wrong_shape_is_named(official_path: Path, tmp_path: Path) -> None:
    def shrink(sd: dict) -> None:
        sd["base_model.visual.ln_pre.weight"] = torch.ones(100)

    path = _rewrite(official_path, tmp_path / "shape.pth", shrink)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches: base_model\.visual\.ln_pre\."):
        load_irra_checkpoint(path, base_config=SMALL)


def test_extra_key_is_named(official_path: Path, tmp_path: Path) -> None:
    def add(sd: dict) -> None:
        sd["base_model.logit_scale"] = torch.tensor(4.6)  # OpenAI CLIP has it, IRRA's state dict does not

    path = _rewrite(official_path, tmp_path / "extra.pth", add)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: base_model\.logit_scale"):
        load_irra_checkpoint(path, base_config=SMALL)


def test_files_that_are_not_irra_checkpoints(tmp_path: Path) -> None:
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an IRRA checkpoint"):
        load_irra_checkpoint(tmp_path / "other.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_irra_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="safe torch checkpoint"):
        load_irra_checkpoint(tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError):
        load_irra_checkpoint(tmp_path / "absent.pth")


class _OpensAFile:
    """A pickle payload that would create a file when unpickled without ``weights_only``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_unsafe_pickles_are_refused(official: IRRA, tmp_path: Path) -> None:
    marker = tmp_path / "side-effect"
    torch.save({"model": official.state_dict(), "hook": _OpensAFile(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="safe torch checkpoint"):
        load_irra_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_filter_accepts_a_bare_state_dict(official: IRRA) -> None:
    bare = {f"module.{k}": v for k, v in official.state_dict().items()}
    assert list(checkpoint_filter_fn(bare)) == list(official.state_dict())


def test_retrieval_model_from_checkpoint(official: IRRA, official_path: Path) -> None:
    model = IRRARetrievalModel.from_checkpoint(official_path, precision="official", base_config=SMALL)
    assert model.version == hashlib.sha256(official_path.read_bytes()).hexdigest()[:12]
    assert model.model.cross_attn is None  # training heads freed after the strict load
    emb = model.encode_texts(["a woman in a red coat"])
    with torch.no_grad():
        ref = official.encode_text(model.token_ids(["a woman in a red coat"]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert not model.crop_text  # official mode keeps all 77 positions: the very same fp16 graph
    assert np.allclose(emb, ref, atol=1e-6)
