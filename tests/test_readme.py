"""The README runs as written (its RL example, with fewer training steps), the numbers it and the docs pages quote
match the JSON, and it stays a front page whose links lead somewhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATED = {"results.md"}  # written by `python -m benchmarks.report` from the JSON itself
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a markdown link or image


def hand_written_pages() -> list[Path]:
    """The README and every docs page written by hand: where quoted numbers live."""
    return [README, *sorted(p for p in DOCS.glob("*.md") if p.name not in GENERATED)]


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its Python example"
    code = blocks[0].replace("steps=200", "steps=10")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([64, 6, 1, 8, 8])" in out
    records = namespace["records"]
    assert {r["nfe"] for r in records} == {3, 9} and {r["metric"] for r in records} >= {"fid", "kid"}


def test_readme_training_is_reproducible(capsys):
    """Two runs of the README's training lines print identical losses: the seeds fix everything."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    lines = block.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("records ="))
    code = "\n".join(lines[:end]).replace("steps=200", "steps=10")
    outs = []
    for _ in range(2):
        exec(compile(code, str(README), "exec"), {})
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "10 " in outs[0]


def test_readme_result_tables_equal_their_json():
    """Every `<!-- report FILE -->` block in the README and in the hand-written docs pages is exactly the table
    `benchmarks.report` renders from FILE: no quoted number can drift from the JSON it cites, wherever it moved."""
    from benchmarks.report import BLOCK, render_block

    found = 0
    for page in hand_written_pages():
        for spec, options, table in BLOCK.findall(page.read_text()):
            found += 1
            assert table == render_block(spec, options), f"{page.relative_to(ROOT)}: table of {spec} differs from JSON"
    assert found, "the README and docs/ lost their result tables"


def test_intervals_quoted_in_prose_are_cells_of_the_rendered_tables():
    """A paired interval the README quotes in prose ("-42.1 [-51.5, -32.7]") is a cell of a rendered table, in the
    README, a docs page's report block or docs/results.md: prose numbers come from the JSON too."""
    import re

    from benchmarks.report import BLOCK

    text = README.read_text()
    tables = "".join(t for page in hand_written_pages() for _, _, t in BLOCK.findall(page.read_text()))
    tables += (ROOT / "docs" / "results.md").read_text()
    prose = re.sub(r"\s+", " ", BLOCK.sub("", text))  # an interval may wrap across lines
    quoted = re.findall(r"-?\d+(?:\.\d+)? \[-?\d+(?:\.\d+)?, -?\d+(?:\.\d+)?\]", prose)
    assert quoted, "the README quotes no interval"
    missing = [q for q in quoted if q not in tables]
    assert not missing, f"intervals quoted in the README but in no rendered table: {missing}"


def test_readme_is_a_front_page_whose_docs_exist():
    """The README stays short, every docs page it links exists, and its documentation map names every docs page."""
    text = README.read_text()
    assert len(text.splitlines()) <= 220, "the README is no longer a front page: move detail into docs/"
    linked = {t.split("#")[0] for t in LINK.findall(text)}
    linked = {t for t in linked if t.startswith("docs/") and t.endswith(".md")}
    assert linked, "the README links no docs page"
    for target in sorted(linked):
        assert (ROOT / target).is_file(), f"the README links {target}, which does not exist"
    unlisted = sorted(f"docs/{p.name}" for p in DOCS.glob("*.md") if f"docs/{p.name}" not in linked)
    assert not unlisted, f"the README's documentation map leaves out {unlisted}"


def test_relative_links_resolve():
    """Every relative link or image in the README and the hand-written docs pages points at a file that exists
    (docs pages link each other as `usage.md` and the repository as `../benchmarks/...`)."""
    broken = []
    for page in hand_written_pages():
        for target in LINK.findall(page.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # an anchor on the same page, or a URL
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_a_run_scored_on_its_way_equals_the_grid_run_it_claims_to_equal():
    """docs/findings.md says the mnist5k budget curve's 3,000-step points are the grid's separately trained
    baselines, bit for bit: every seed the two committed files share gives the same FIDs."""
    import json

    results = ROOT / "benchmarks" / "results"
    curve = json.loads((results / "mnist5k_baseline_plateau.json").read_text())["runs"]
    grid = json.loads((results / "mnist5k_sweep.json").read_text())["runs"]
    shared = [k.rpartition("|")[2] for k in curve if k.startswith("baseline:steps=3000|")
              and f"baseline|{k.rpartition('|')[2]}" in grid]
    assert shared, "no seed in both files"
    for seed in shared:
        fid = {r["nfe"]: r["value"] for r in grid[f"baseline|{seed}"] if r["variant"] == "baseline"
               and r["metric"] == "fid"}
        for r in curve[f"baseline:steps=3000|{seed}"]:
            if r["metric"] == "fid":
                assert r["value"] == fid[r["nfe"]], (seed, r["nfe"])


@pytest.mark.parametrize("name", ["mnist5k_lof_rescore.json", "mnist5k_lof_baseline.json"])
def test_a_rescored_or_retrained_model_equals_the_grid_run_it_claims_to_equal(name):
    """docs/findings.md says the dpmpp_2m_lof files' DPM-Solver++ records equal the mnist5k grid's bit for bit
    (kept models rescored, and the seed-1 baseline trained again): every record of a run both files hold, under a
    solver both scored, is the same."""
    import json

    results = ROOT / "benchmarks" / "results"
    key = lambda r: (r["sampler"], r["nfe"], r["metric"])  # noqa: E731
    grid = json.loads((results / "mnist5k_sweep.json").read_text())["runs"]
    runs = json.loads((results / name).read_text())["runs"]
    compared = 0
    for run, records in runs.items():
        theirs = {key(r): r["value"] for r in grid[run]}
        for r in records:
            if key(r) in theirs:
                assert r["value"] == theirs[key(r)], (run, key(r))
                compared += 1
    assert compared >= 9 * len(runs), "too few shared records to back the claim"
