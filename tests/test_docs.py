"""The README and docs/ as a user reads them: every Python block runs as written (in a fresh
namespace, in an empty folder), every relative link and anchor resolves, and the README
keeps the commands CI and users rely on. A block right after a line `<!-- test: cuda -->`
needs a GPU: it runs where one is present (CUDA tests' rules: skipped without one, an
error with RNNFUSED_REQUIRE_CUDA=1); one after `<!-- test: onnx -->` needs the ONNX
packages (the README's `make test` installs them; the floor run of `make test-floor` does
not)."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKER = re.compile(r"^<!-- test: (\w+) -->$")


def python_blocks(path):
    """[(first line number, marker or None, code)] of the ```python blocks of a page."""
    blocks, lines = [], open(path, encoding="utf-8").read().splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
            marker = MARKER.match(previous)
            end = lines.index("```", index + 1)
            blocks.append((index + 1, marker.group(1) if marker else None, "\n".join(lines[index + 1:end])))
            index = end
        index += 1
    return blocks


BLOCKS = [(path, line, marker, code) for path in PAGES for line, marker, code in python_blocks(path)]


def _id(block):
    return f"{os.path.relpath(block[0], ROOT)}:{block[1]}"


@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.cuda] if b[2] == "cuda" else [], id=_id(b))
                                   for b in BLOCKS])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    path, line, marker, code = block
    assert marker in (None, "cuda", "onnx"), f"{_id(block)}: unknown marker {marker!r}"
    if marker == "onnx":
        for package in ("onnx", "onnxscript"):
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{_id(block)}", "exec"), {"__name__": "__main__"})


def test_the_readme_has_runnable_blocks_and_the_commands():
    assert sum(1 for b in BLOCKS if b[0].endswith("README.md") and b[2] is None) >= 2
    readme = open(PAGES[0], encoding="utf-8").read()
    for command in ("make test", "make bench", "pip install --no-build-isolation .",
                    "python -m build --sdist --no-isolation",
                    "pip install --no-build-isolation dist/rnnfused-0.1.0.tar.gz"):
        assert command in readme, command
    assert len(readme.splitlines()) <= 160
    for internal in ("seed's", "the issue", "shared/"):
        assert internal not in readme, internal


def _slug(heading):
    """The anchor a Markdown renderer gives a heading (GitHub's rule)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", open(resolved, encoding="utf-8").read(), re.MULTILINE)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_make_test_runs_the_whole_suite():
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    assert re.search(r"^PYTEST := -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder$", makefile, re.MULTILINE)
    assert re.search(r"^test: .*\n\t\$\(PY\) \$\(PYTEST\) tests$", makefile, re.MULTILINE)
