"""The parity core itself: fill rule, key checks, comparisons, and a missing runner is a failure."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from models.parity import compare_keys, compare_output, crc32_normal_fill, fill_module, main, run_case


def test_fill_rule_matches_readme_formula() -> None:
    name = "encoder.layer.0.weight"
    seed = zlib.crc32(name.encode()) & 0x7FFFFFFF
    v = np.random.default_rng(seed).standard_normal((4, 3, 2))
    assert np.allclose(crc32_normal_fill(name, (4, 3, 2)), (v / np.sqrt(6)).astype(np.float32))
    v1 = np.random.default_rng(zlib.crc32(b"ln.weight") & 0x7FFFFFFF).standard_normal(5)
    assert np.allclose(crc32_normal_fill("ln.weight", (5,)), 1 + 0.1 * v1)
    v2 = np.random.default_rng(zlib.crc32(b"ln.bias") & 0x7FFFFFFF).standard_normal(5)
    assert np.allclose(crc32_normal_fill("ln.bias", (5,)), 0.02 * v2)
    assert crc32_normal_fill("bn.running_var", (7,)).min() >= 1.0
    assert crc32_normal_fill("scale", ()).shape == ()


def test_fill_module_checks_official_keys_and_keeps_integers() -> None:
    module = torch.nn.Linear(3, 2)
    module.register_buffer("position_ids", torch.arange(4))
    keys = [("weight", (2, 3), "f32"), ("bias", (2,), "f32"), ("position_ids", (4,), "i64")]
    fill_module(module, keys)
    assert torch.equal(module.position_ids, torch.arange(4))
    assert np.allclose(module.weight.detach().numpy(), crc32_normal_fill("weight", (2, 3)))
    with pytest.raises(AssertionError, match="shape mismatch weight"):
        fill_module(module, [("weight", (3, 3), "f32"), ("bias", (2,), "f32"), ("position_ids", (4,), "i64")])
    assert any("missing" in p for p in compare_keys(module, [*keys, ("extra", (1,), "f32")]))


def test_compare_output_tolerances_and_exact_ints(tmp_path: Path) -> None:
    assert compare_output({"value": 1.0, "atol": 1e-3}, tmp_path, 1.0005).passed
    assert not compare_output({"value": 1.0, "atol": 1e-5}, tmp_path, 1.01).passed
    assert compare_output({"value": [1, 2, 3]}, tmp_path, np.array([1, 2, 3])).passed
    assert not compare_output({"value": [1, 2, 3]}, tmp_path, np.array([1, 2, 4])).passed
    assert not compare_output({"value": [1, 2]}, tmp_path, np.array([1, 2, 3])).passed
    np.save(tmp_path / "x.npy", np.ones((2, 2), np.float32))
    assert compare_output({"file": "x.npy", "atol": 1e-6}, tmp_path, torch.ones(2, 2)).passed
    assert compare_output({"value": ["a", "b"]}, tmp_path, ["a", "b"]).passed
    assert compare_output({"value": [[1, 2], [3]]}, tmp_path, [np.array([1, 2]), [3]]).passed  # ragged
    assert not compare_output({"value": [[1, 2], [3]]}, tmp_path, [[1, 2], [4]]).passed


def test_unknown_method_is_a_failure_not_a_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = tmp_path / "nomethod" / "c1"
    case.mkdir(parents=True)
    (case / "case.json").write_text(json.dumps({"method": "nosuch", "kind": "encode", "inputs": {},
                                                "outputs": {"y": {"value": 1}}}))
    results = run_case(case / "case.json")
    assert [r.checked.passed for r in results] == [False]
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0 passed, 1 failed"


def test_checked_from_a_runner_is_honoured_under_python_m(tmp_path: Path) -> None:
    """``python -m models.parity`` runs the module as __main__; a runner's Checked must still count."""
    import subprocess
    import sys

    case = tmp_path / "cases" / "probe" / "c1"
    case.mkdir(parents=True)
    (case / "case.json").write_text(json.dumps({"method": "probe_checked", "kind": "k", "inputs": {},
                                                "outputs": {"y": {"value": 999}}}))
    runner = Path(__file__).parent.parent / "models" / "parity_runners" / "probe_checked.py"
    runner.write_text("from models.parity import Checked\nRUNNERS = {'k': lambda case: {'y': Checked(True, 0.0)}}\n")
    try:
        out = subprocess.run([sys.executable, "-m", "models.parity", str(tmp_path / "cases")], capture_output=True,
                             text=True, cwd=Path(__file__).parent.parent)
    finally:
        runner.unlink()
    assert out.stdout.strip().splitlines()[-1] == "1 passed, 0 failed", out.stdout + out.stderr
