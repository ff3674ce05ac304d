"""Parity runner: checks a reimplementation against golden outputs recorded from the authors' code.

Usage: ``python -m models.parity PATH [PATH ...]``

Every ``case.json`` found below the given paths is run (format: ``shared/parity/README.md``). The case's
``method`` selects ``models.parity_runners.<method>`` and its ``kind`` selects ``RUNNERS[kind]`` there, so a
new case of a known kind (other seeds, shapes, images) runs without code changes. A case that cannot be run
is a failure, never a skip. One line per output, ``PASS|FAIL <method>/<case> <output> max_abs=...``, then a
last line ``N passed, N failed``; the exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

FILL_RULE = "crc32-normal-v1"


@dataclass
class Checked:
    """An output the runner compared itself, as the case's notes define (e.g. mask pixel counts)."""

    passed: bool
    max_abs: float
    detail: str = ""


@dataclass
class ParityCase:
    """One decoded ``case.json``: what to build, what to feed, what must come out."""

    dir: Path
    raw: dict[str, Any]
    inputs: dict[str, Any]
    keys: list[tuple[str, tuple[int, ...], str]] | None

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def method(self) -> str:
        return self.raw["method"]

    @property
    def kind(self) -> str:
        return self.raw["kind"]

    @property
    def config(self) -> dict[str, Any]:
        return self.raw.get("config") or {}

    @property
    def outputs(self) -> dict[str, Any]:
        return self.raw.get("outputs") or {}

    @property
    def label(self) -> str:
        return f"{self.method}/{self.name}"


# --------------------------------------------------------------------------------------------- fill rule


def crc32_normal_fill(name: str, shape: Iterable[int]) -> np.ndarray:
    """The value of one state_dict entry under fill rule ``crc32-normal-v1`` (parity README)."""
    shape = tuple(int(s) for s in shape)
    seed = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    v = np.random.default_rng(seed).standard_normal(shape)
    if len(shape) == 0:
        out = 1.0 + 0.1 * v
    elif len(shape) == 1:
        if name.endswith("running_var"):
            out = 1.0 + 0.1 * np.abs(v)
        elif name.endswith("weight"):
            out = 1.0 + 0.1 * v
        else:
            out = 0.02 * v
    else:
        out = v / math.sqrt(float(np.prod(shape[1:])))
    return np.asarray(out, dtype=np.float32)


def read_keys_tsv(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows ``name<TAB>shape<TAB>dtype`` of an official key list; shape is written like ``[3, 4]``."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        name, shape_text = parts[0], parts[1] if len(parts) > 1 else "[]"
        dtype = parts[2] if len(parts) > 2 else ""
        dims = shape_text.strip().strip("[]()").replace("torch.Size", "")
        shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        rows.append((name, shape, dtype))
    return rows


def compare_keys(module: torch.nn.Module, keys: list[tuple[str, tuple[int, ...], str]]) -> list[str]:
    """Differences between a module's state_dict and an official key list (empty when they agree)."""
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    official = {name: shape for name, shape, _ in keys}
    problems = [f"missing (official key not in model): {k}" for k in official if k not in mine]
    problems += [f"unexpected (model key not official): {k}" for k in mine if k not in official]
    problems += [
        f"shape mismatch {k}: model {mine[k]} vs official {official[k]}"
        for k in official
        if k in mine and mine[k] != official[k]
    ]
    return problems


def fill_module(module: torch.nn.Module, keys: list[tuple[str, tuple[int, ...], str]] | None = None) -> None:
    """Fill every floating state_dict entry of ``module`` in place by ``crc32-normal-v1``.

    With ``keys`` (an official key list) the module's names and shapes must first equal it exactly.
    Integer entries (index buffers, ``position_ids``) keep the values the module computed itself.
    """
    if keys is not None:
        problems = compare_keys(module, keys)
        if problems:
            shown = "\n  ".join(problems[:40])
            more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
            raise AssertionError(f"state_dict differs from the official key list:\n  {shown}{more}")
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(tensor):
                continue
            value = torch.from_numpy(crc32_normal_fill(name, tensor.shape))
            tensor.data.copy_(value.to(tensor.dtype))


# --------------------------------------------------------------------------------------------- inputs


def _decode_input(spec: Any, case_dir: Path) -> Any:
    if not isinstance(spec, dict) or "kind" not in spec:
        return spec
    kind = spec["kind"]
    if kind == "normal":
        rng = np.random.default_rng(spec["seed"])
        return rng.standard_normal(tuple(spec["shape"])).astype(np.float32)
    if kind == "ints":
        try:
            return np.asarray(spec["value"], dtype=np.int64)
        except ValueError:  # ragged nested lists stay lists
            return spec["value"]
    if kind == "floats":
        return np.asarray(spec["value"], dtype=np.float32)
    if kind == "png":
        with Image.open(case_dir / spec["file"]) as img:
            return img.convert("RGB")
    if kind == "str":
        return spec["value"]
    raise ValueError(f"unknown input kind {kind!r}")


def load_case(case_json: Path) -> ParityCase:
    """Read and decode one ``case.json``; the keys file is looked up beside the case, then one level up."""
    case_json = Path(case_json)
    raw = json.loads(case_json.read_text())
    case_dir = case_json.parent
    inputs = {name: _decode_input(spec, case_dir) for name, spec in (raw.get("inputs") or {}).items()}
    keys = None
    if raw.get("keys"):
        for folder in (case_dir, case_dir.parent):
            if (folder / raw["keys"]).exists():
                keys = read_keys_tsv(folder / raw["keys"])
                break
        else:
            raise FileNotFoundError(f"keys file {raw['keys']} not found for {case_json}")
    if raw.get("fill") not in (None, FILL_RULE):
        raise ValueError(f"unsupported fill rule {raw['fill']!r}")
    return ParityCase(dir=case_dir, raw=raw, inputs=inputs, keys=keys)


# --------------------------------------------------------------------------------------------- comparison


def _expected_value(spec: dict[str, Any], case_dir: Path) -> Any:
    if "file" in spec:
        return np.load(case_dir / spec["file"])
    return spec["value"]


def _is_integral(value: Any) -> bool:
    arr = np.asarray(value)
    return arr.dtype.kind in "iub"


def compare_output(expected_spec: dict[str, Any], case_dir: Path, actual: Any) -> Checked:
    """Compare one produced output with its recorded value, as the parity README says."""
    if isinstance(actual, Checked):
        return actual
    expected = _expected_value(expected_spec, case_dir)
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().float().cpu().numpy() if actual.is_floating_point() else actual.cpu().numpy()
    if isinstance(expected, str) or (isinstance(expected, list) and expected and
                                     (_contains_str(expected) or _is_ragged(expected))):
        same = _jsonable(actual) == expected  # strings and ragged integer lists compare exactly
        return Checked(same, 0.0 if same else math.inf, "" if same else f"got {_short(actual)}")
    exp_arr = np.asarray(expected)
    act_arr = np.asarray(actual)
    if exp_arr.shape != act_arr.shape:
        return Checked(False, math.inf, f"shape {act_arr.shape} != recorded {exp_arr.shape}")
    if _is_integral(exp_arr) and _is_integral(act_arr) and "atol" not in expected_spec:
        diff = np.abs(exp_arr.astype(np.int64) - act_arr.astype(np.int64))
        max_abs = float(diff.max()) if diff.size else 0.0
        return Checked(max_abs == 0.0, max_abs)
    exp_f, act_f = exp_arr.astype(np.float64), act_arr.astype(np.float64)
    max_abs = float(np.abs(exp_f - act_f).max()) if exp_f.size else 0.0
    atol = float(expected_spec.get("atol", 0.0))
    rtol = float(expected_spec.get("rtol", 0.0))
    ok = bool(np.allclose(act_f, exp_f, atol=atol, rtol=rtol, equal_nan=False))
    return Checked(ok, max_abs)


def _contains_str(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return any(_contains_str(v) for v in value)
    return False


def _is_ragged(value: list[Any]) -> bool:
    try:
        np.asarray(value)
    except ValueError:
        return True
    return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(_jsonable(value))
    return text if len(text) < 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------- running

Runner = Callable[[ParityCase], Mapping[str, Any]]


def find_runner(method: str, kind: str) -> Runner:
    """``models.parity_runners.<method>.RUNNERS[kind]``; raises when the method or kind is unknown."""
    module = importlib.import_module(f"models.parity_runners.{method}")
    runners: dict[str, Runner] = module.RUNNERS
    if kind not in runners:
        raise KeyError(f"no parity runner for kind {kind!r} of method {method!r} (known: {sorted(runners)})")
    return runners[kind]


@dataclass
class OutputResult:
    label: str
    output: str
    checked: Checked

    def line(self) -> str:
        status = "PASS" if self.checked.passed else "FAIL"
        detail = f" {self.checked.detail}" if self.checked.detail else ""
        return f"{status} {self.label} {self.output} max_abs={self.checked.max_abs:.3g}{detail}"


def run_case(case_json: Path) -> list[OutputResult]:
    """Run one case; any exception becomes a failure of every output it should have produced."""
    label = f"{Path(case_json).parent.parent.name}/{Path(case_json).parent.name}"
    try:
        case = load_case(case_json)
        label = case.label
        torch.manual_seed(0)
        produced = dict(find_runner(case.method, case.kind)(case))
    except Exception as exc:  # noqa: BLE001 - a case that cannot run is a failure, reported, not raised
        detail = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:400]
        if "-v" in sys.argv:
            traceback.print_exc()
        try:
            names = list(json.loads(Path(case_json).read_text()).get("outputs", {})) or ["<case>"]
        except Exception:  # noqa: BLE001
            names = ["<case>"]
        return [OutputResult(label, name, Checked(False, math.inf, detail)) for name in names]
    results = []
    for name, spec in case.outputs.items():
        if name not in produced:
            results.append(OutputResult(label, name, Checked(False, math.inf, "not produced by the runner")))
            continue
        try:
            checked = compare_output(spec, case.dir, produced[name])
        except Exception as exc:  # noqa: BLE001
            checked = Checked(False, math.inf, f"compare error: {type(exc).__name__}: {exc}")
        results.append(OutputResult(label, name, checked))
    return results


def find_cases(paths: Iterable[str | Path]) -> list[Path]:
    cases: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name == "case.json":
            cases.append(path)
        elif path.is_dir():
            cases.extend(sorted(path.rglob("case.json")))
        else:
            raise FileNotFoundError(f"no case.json at {path}")
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.parity", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="case.json files or folders to search for them")
    parser.add_argument("-v", action="store_true", help="print tracebacks of failing cases")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = find_cases(args.paths)
    passed = failed = 0
    for case_json in cases:
        for result in run_case(case_json):
            print(result.line(), flush=True)
            passed += result.checked.passed
            failed += not result.checked.passed
    if not cases:
        print("no case.json found", file=sys.stderr)
        failed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the importable module's main, so runners' ``models.parity.Checked`` is the class compared against.
    from models.parity import main as module_main

    sys.exit(module_main())
