"""The documentation stays true: every ``python`` block of the docs and the README runs, every
``docs/<page>.md#<anchor>`` cited anywhere in the repository exists, and the README's figures are
exactly the rendering of the committed record of ``benchmarks/readme_figures.py``.

Code blocks: a page's ```` ```python ```` blocks run in order in one namespace (a page may build on
its earlier blocks); blocks fenced ```` ```python signature ```` list call signatures and are not
run. Anchors are GitHub's (``docs/README.md#citing-the-docs-from-code``), which the Sphinx build
produces too (``myst_heading_anchors`` in ``docs/conf.py``).
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests._modules import load_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(`{3,})(.*)$")
CITATION = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
LOCAL_LINK = re.compile(r"\]\(([\w.-]+\.md)?#([\w-]+)\)")


def code_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, info, code)`` of every fenced block of a Markdown file (``line`` 1-based, of the
    first code line)."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        blocks.append((start + 1, info, "\n".join(lines[start:i])))
        i += 1
    return blocks


def github_anchors(path: Path) -> set[str]:
    """The heading anchors GitHub (and MyST with ``myst_heading_anchors``) gives ``path``:
    lower case, punctuation dropped, spaces as ``-``; headings inside code blocks do not count."""
    text = path.read_text()
    for _, _, code in code_blocks(path):
        text = text.replace(code, "")
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, info, code in code_blocks(path) if info == "python"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # examples that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(page):
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_code_blocks_are_found():
    """The extractor sees the blocks (a regression here would make the test above vacuous)."""
    blocks = code_blocks(DOCS / "getting-started.md")
    assert any(info == "python" and "deq_fast.solve(" in code for _, info, code in blocks)
    assert all(info != "python signature" for _, info, _ in blocks)
    signatures = [code for _, info, code in code_blocks(DOCS / "contracts.md") if info == "python signature"]
    assert any("anderson_solver(func, x0" in code for code in signatures)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    keep = (".py", ".md", ".sh", ".h", ".cpp", ".cu", ".toml", "run")
    return [ROOT / n for n in names if n.endswith(keep) and (ROOT / n).is_file()]


def test_every_cited_docs_anchor_exists():
    cited = {(m.group(1), m.group(2), str(path.relative_to(ROOT)))
             for path in tracked_text_files() for m in CITATION.finditer(path.read_text())}
    assert len(cited) > 20                      # the code cites the docs; the scan found them
    anchors = {page.name: github_anchors(page) for page in DOCS.glob("*.md")}
    missing = [(f"docs/{page}#{anchor}", where) for page, anchor, where in sorted(cited)
               if anchor not in anchors.get(page, set())]
    assert not missing, f"cited anchors that no heading defines: {missing}"


def test_links_between_pages_point_at_headings():
    missing = []
    for page in DOCS.glob("*.md"):
        for m in LOCAL_LINK.finditer(page.read_text()):
            target = DOCS / (m.group(1) or page.name)
            if not target.is_file() or m.group(2) not in github_anchors(target):
                missing.append(f"{page.name} -> {m.group(1) or ''}#{m.group(2)}")
    assert not missing, missing


def test_anchor_rule_is_githubs():
    anchors = github_anchors(DOCS / "contracts.md")
    assert {"locuslabdeq-solvers", "torchdeq-solvers", "torchdeq-deq-module"} <= anchors
    assert "locuslab/deq-solvers" not in anchors


def test_changelog_has_unreleased_and_the_package_version():
    """Keep a Changelog: an Unreleased section first, then one section per version, the current
    one (``deq_fast.__version__``, which pyproject.toml reads) included."""
    import deq_fast
    versions = re.findall(r"^## \[?([\w.]+)\]?", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert versions[0] == "Unreleased"
    assert deq_fast.__version__ in versions[1:]


def readme_commands() -> list[str]:
    """The commands of the README's ``bash`` blocks, comments stripped."""
    lines = [line.split("#")[0].strip() for _, info, code in code_blocks(ROOT / "README.md")
             if info == "bash" for line in code.splitlines()]
    return [line for line in lines if line]


def test_ci_runs_the_readme_commands():
    """CI installs and tests exactly as the README says (its quick start, command for command)."""
    commands = readme_commands()
    assert "python -m pytest" in commands and "deq-fast train" in commands
    assert 'pip install --no-build-isolation -e ".[train,test]"' in commands
    ci = [line.strip().replace(" -q ", " ") for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    missing = [c for c in commands if c != "deq-fast train" and c not in ci]
    assert not missing, f"README commands that .ci/run does not run: {missing}"


# ------------------------------------------------------------------------------ README figures
@pytest.fixture(scope="module")
def figures():
    return load_module("readme_figures", ROOT / "benchmarks" / "readme_figures.py")


def test_readme_figures_are_the_committed_record(figures):
    data = json.loads(figures.DEFAULT_JSON.read_text())
    assert not data["smoke"]
    assert [r["seed"] for r in data["main_job"]["runs"]] == list(figures.SEEDS)
    block = figures.current_block(figures.DEFAULT_README.read_text())
    assert block == figures.render(data), (
        "README.md's figures differ from benchmarks/results/readme.json: do not edit them by hand; "
        "run python benchmarks/readme_figures.py (or --render-only after changing the rendering)")


def test_rendering_is_deterministic_and_shows_every_figure(figures):
    data = json.loads(figures.DEFAULT_JSON.read_text())
    block = figures.render(data)
    assert figures.render(json.loads(json.dumps(data))) == block
    changed = copy.deepcopy(data)
    changed["solvers"][0]["ratio"] += 0.05
    assert figures.render(changed) != block
    changed = copy.deepcopy(data)
    changed["main_job"]["runs"][1]["test_acc"] -= 0.01
    assert figures.render(changed) != block


def test_replace_block_keeps_the_rest_and_refuses_missing_markers(figures):
    text = f"head\n{figures.BEGIN}\nold\n{figures.END}\ntail\n"
    new = figures.replace_block(text, "new table")
    assert new == f"head\n{figures.BEGIN}\nnew table\n{figures.END}\ntail\n"
    assert figures.current_block(new) == "new table"
    with pytest.raises(ValueError, match="figures:begin"):
        figures.replace_block("no markers", "x")


@pytest.mark.slow
def test_smoke_run_writes_record_and_readme_block(figures, tmp_path):
    threads = torch.get_num_threads()
    try:
        _check_smoke_run(figures, tmp_path)
    finally:
        torch.set_num_threads(threads)               # the script measures with one thread


def _check_smoke_run(figures, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{figures.BEGIN}\n{figures.END}\nrest\n")
    record = tmp_path / "readme.json"
    data = figures.main(["--smoke", "--json", str(record), "--readme", str(readme),
                         "--runs-dir", str(tmp_path / "runs")])
    assert json.loads(record.read_text()) == json.loads(json.dumps(data, sort_keys=True))
    assert figures.current_block(readme.read_text()) == figures.render(data)
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
    assert [r["seed"] for r in data["main_job"]["runs"]] == [0]
    assert 0.0 <= data["main_job"]["runs"][0]["test_acc"] <= 1.0
    assert (tmp_path / "runs" / "seed0" / "metrics.jsonl").is_file()
    assert [r["method"] for r in data["solvers"]] == list(figures.METHODS)
    for row in data["solvers"]:
        assert row["ratio"] > 0
        assert row["ops_per_iter"]["deq_fast"] < row["ops_per_iter"]["torchdeq"]
        assert row["syncs_per_solve"]["deq_fast"] <= row["syncs_per_solve"]["torchdeq"]
