"""Every Python block in the README and in docs/ runs as written (a reader pastes a document's blocks
into one session, in order); the README's pytest example passes under pytest. A block preceded by
``<!-- not run by the docs test: REASON -->`` is left out, and the reason is in the document."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(<!-- not run by the docs test:[^>]*-->\s*)?```python\n(.*?)```", re.S)


def python_blocks(document: str) -> list[str]:
    text = (ROOT / document).read_text(encoding="utf-8")
    return [code for skip, code in FENCE.findall(text) if not skip]


def test_the_documents_have_python_blocks_and_skip_few():
    counts = {d: len(python_blocks(d)) for d in DOCUMENTS}
    assert counts["README.md"] >= 3
    skipped = sum(len(re.findall("not run by the docs test", (ROOT / d).read_text())) for d in DOCUMENTS)
    assert skipped <= 1  # the NDIF example, which needs an API key and the network


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if python_blocks(d)])
def test_every_python_block_runs_as_written(document, tmp_path):
    blocks = python_blocks(document)
    tests = [b for b in blocks if re.search(r"^def test_", b, re.M)]
    script = "\n\n".join(b for b in blocks if b not in tests)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if script:
        (tmp_path / "blocks.py").write_text(script, encoding="utf-8")
        done = subprocess.run([sys.executable, "blocks.py"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, f"{document}:\n{done.stderr[-3000:]}"
    for i, block in enumerate(tests):
        (tmp_path / f"test_block{i}.py").write_text(block, encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"test_block{i}.py"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0 and " passed" in done.stdout, f"{document}:\n{done.stdout[-3000:]}"
