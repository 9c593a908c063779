"""The README's Python blocks run as written, and type-check under ``mypy --strict``:
an example there can no longer rot. Each ```python block is self-contained (blocks
that need several processes are fenced ```py and are run by the examples' tests)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)

pytestmark = pytest.mark.backward_mode("default")  # nothing here depends on the mode


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index, tmp_path):
    path = tmp_path / f"readme_block_{index}.py"
    path.write_text(BLOCKS[index])
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (the 'typecheck' extra)")
def test_blocks_type_check_strict(tmp_path):
    for i, block in enumerate(BLOCKS):
        (tmp_path / f"readme_block_{i}.py").write_text(block)
    # torch leaves some functions unannotated (Tensor.backward): calling them is not our
    # examples' fault, everything else is --strict.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--untyped-calls-exclude=torch", "--follow-imports=silent", "--no-incremental",
         "--cache-dir", str(tmp_path / ".mypy_cache"), *sorted(str(p) for p in tmp_path.glob("readme_block_*.py"))],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
