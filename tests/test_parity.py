"""Every parity case copied under tests/parity runs through the same runner as ``python -m models.parity``."""

from pathlib import Path

import pytest

from models.parity import find_cases, run_case

PARITY_DIR = Path(__file__).parent / "parity"
CASES = find_cases([PARITY_DIR]) if PARITY_DIR.exists() else []


def test_parity_fixtures_present() -> None:
    assert CASES, "no parity cases under tests/parity"


@pytest.mark.parametrize("case_json", CASES, ids=[f"{c.parent.parent.name}/{c.parent.name}" for c in CASES])
def test_parity_case(case_json: Path) -> None:
    results = run_case(case_json)
    failures = [r.line() for r in results if not r.checked.passed]
    assert results and not failures, "\n".join(failures)
