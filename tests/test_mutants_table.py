"""scripts/mutants.py's table stays in step with the code: each mutant still names code that exists, once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mutants_module():
    spec = importlib.util.spec_from_file_location("llmdiff_mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclass looks its module up there)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_names_code_that_occurs_once_and_tests_that_exist() -> None:
    mutants = _mutants_module()
    assert mutants.check_table() == []
    assert all(m.old != m.new for m in mutants.MUTANTS)


def test_the_table_check_sees_a_stale_mutant(tmp_path: Path) -> None:
    mutants = _mutants_module()
    stale = mutants.MUTANTS[0]
    (tmp_path / Path(stale.path).parent).mkdir(parents=True)
    (tmp_path / stale.path).write_text("the code moved on\n")
    problems = [p for p in mutants.check_table(tmp_path) if p.startswith(stale.name + ":")]
    assert any("occurs 0 times" in p for p in problems) and any("no test file" in p for p in problems)
