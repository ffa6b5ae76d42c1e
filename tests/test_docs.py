"""The documentation's rules: the site builds with --strict, the README stays a short
front door whose links resolve, the results pages are what their JSON renders (nobody
edits a number by hand), and every `textops` subcommand and `make` target the pages
name exists."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300
QUICK_START = ("make deploy", "make test", "source .venv/bin/activate",
               "curl -s -X POST http://127.0.0.1:8000/predict")
# The `textops` command as specified; the real one (textops/cli.py) is read when present.
SPEC_SUBCOMMANDS = {"run", "deploy", "undeploy", "serve", "predict", "promote", "rollback",
                    "history", "retrain", "tune", "report"}
# What a lab notebook leaves behind: footnote marks on figures.
SUPERSCRIPTS = re.compile("[\u00b9\u00b2\u00b3\u2070\u2074-\u2079]")


def pages() -> list[Path]:
    """README.md and every hand-written page (docs/results/ is generated)."""
    return [README, *sorted(p for p in DOCS.rglob("*.md")
                            if DOCS / "results" not in p.parents)]


def split_code(text: str) -> tuple[str, str]:
    """(the code: fenced blocks and inline spans, the prose around them)."""
    fenced = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.S | re.M)
    blocks = [m.group(0) for m in fenced.finditer(text)]
    rest = fenced.sub("\n", text)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return "\n".join(blocks + spans), re.sub(r"`[^`\n]+`", " ", rest)


def mentioned(pattern: str) -> dict[str, set[str]]:
    """{word after the command: the pages naming it}, from the pages' code only, shell
    comments left out."""
    found: dict[str, set[str]] = {}
    for page in pages():
        code, _ = split_code(page.read_text(encoding="utf-8"))
        code = re.sub(r"(?:^|[ \t])#[^\n]*", "", code, flags=re.M)
        for word in re.findall(pattern, code):
            found.setdefault(word, set()).add(str(page.relative_to(ROOT)))
    return found


def slug(heading: str) -> str:
    """The anchor MkDocs (and GitHub, for these headings) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", re.sub(r"`|\*\*", "", heading)).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (those inside code blocks are not headings)."""
    text = re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1", "", page.read_text(encoding="utf-8"),
                  flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", text, re.M)}


# ---------------------------------------------------------------- the site


def test_the_site_builds_with_strict_checks(tmp_path):
    """A broken link or anchor, or a page missing from `nav`, is a warning that
    --strict turns into a failure (mkdocs.yml's `validation:`)."""
    assert importlib.util.find_spec("material"), "mkdocs-material is missing: pip install " \
                                                 "-e '.[dev]'"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    assert (tmp_path / "site" / "index.html").is_file()


def nav_files(node) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, dict):
        return set().union(*(nav_files(v) for v in node.values()))
    return set().union(*(nav_files(v) for v in node)) if node else set()


def test_every_page_is_in_the_nav():
    """Said here by name, before the strict build says it in a warning: a results page
    that bench/results.py wrote needs its line in mkdocs.yml's nav too."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = nav_files(config["nav"])
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert not on_disk - listed, f"pages missing from mkdocs.yml's nav: {on_disk - listed}"
    assert not listed - on_disk, f"nav entries without a page: {listed - on_disk}"


# ---------------------------------------------------------------- the README


def test_the_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most "
                                       f"{README_MAX_LINES}): move the detail to docs/")
    missing = [command for command in QUICK_START if command not in text]
    assert not missing, f"the quick start lacks {missing}"
    assert "<!-- results summary -->" in text and "<!-- /results summary -->" in text, \
        "the results summary's markers are gone (bench/results.py renders between them)"


def test_the_readme_links_resolve():
    """Every relative link in README.md names a file or folder of the repository, and an
    anchor on a page names one of its headings."""
    _, prose = split_code(README.read_text(encoding="utf-8"))
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose)
    assert links, "README.md links to no page"
    broken = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else README
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken, "README.md's broken links:\n  " + "\n  ".join(broken)


def test_no_lab_notebook_in_the_pages():
    """Figures live on the generated results pages, not in prose with footnote marks."""
    marked = {str(p.relative_to(ROOT)): sorted(set(SUPERSCRIPTS.findall(p.read_text())))
              for p in pages() if SUPERSCRIPTS.search(p.read_text())}
    assert not marked, f"footnote marks on figures: {marked}"
    notebooks = [str(p.relative_to(ROOT)) for p in pages() if "Measured here" in p.read_text()]
    assert not notebooks, f"a 'Measured here' section in {notebooks}: use docs/results/"


# ---------------------------------------------------------------- the results pages


def test_each_results_page_is_what_its_json_renders():
    """docs/results/<name>.md is bench/results.py's rendering of bench/results/<name>.json,
    and the index lists exactly those: a number changes by measuring again, never by
    editing the page (`python bench/results.py` re-renders them all)."""
    sys.path.insert(0, str(ROOT / "bench"))
    results = importlib.import_module("results")
    measured = [results.load(path) for path in sorted(results.RESULTS.glob("*.json"))]
    for result in measured:
        page = DOCS / "results" / f"{result.name}.md"
        assert page.is_file(), f"{page.relative_to(ROOT)} is missing: python bench/results.py"
        assert page.read_text(encoding="utf-8") == results.page(result), (
            f"{page.relative_to(ROOT)} differs from what bench/results/{result.name}.json "
            "renders: never edit it by hand; python bench/results.py re-renders it")
    names = {r.name for r in measured} | {"index"}
    orphans = {p.stem for p in (DOCS / "results").glob("*.md")} - names
    assert not orphans, f"results pages without a JSON in bench/results/: {orphans}"
    index = (DOCS / "results" / "index.md").read_text(encoding="utf-8")
    assert index == results.index(measured), "docs/results/index.md is stale: " \
                                             "python bench/results.py"
    if hasattr(results, "with_summary"):  # the README's summary table, between its markers
        readme = README.read_text(encoding="utf-8")
        assert readme == results.with_summary(readme, measured), (
            "README.md's results summary differs from what bench/results/ renders: "
            "python bench/results.py")


def test_a_merged_page_says_where_each_figure_was_measured():
    """A page that keeps runs of several sessions says when it was last published, not
    measured, and a summary figure older than the page keeps its own date and CPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    results = importlib.import_module("results")
    stamp = {"date": "2026-12-07", "commit": "a" * 40, "dirty": False,
             "cpu": {"model": "CPU B", "extensions": [], "cores": 2}}
    result = results.Result(
        "x", "X", "about", [results.Table("t", ["figure", "measured on"],
                                          [[1, "2026-12-01, CPU A"]])],
        stamp=stamp, summary=[["old figure", 1, "2026-12-01, CPU A"], ["new figure", 2]],
        merged=True)
    stamped = results.page(result).splitlines()[2]
    assert stamped.startswith("Last published on 2026-12-07") and "Each row was measured" \
        in stamped
    table = results.summary_table([result])
    assert "| old figure | 1 | [X](docs/results/x.md) | 2026-12-01, CPU A |" in table
    assert "| new figure | 2 | [X](docs/results/x.md) | 2026-12-07, CPU B |" in table
    assert results.measured_on({"measured": {"date": "2026-12-01", "cpu": "CPU A"}}) == \
        "2026-12-01, CPU A"


# ---------------------------------------------------------------- commands named


def real_subcommands() -> set[str] | None:
    """The subcommands of textops/cli.py's typer app; None while it does not exist."""
    try:
        cli = importlib.import_module("textops.cli")
    except ModuleNotFoundError as err:
        if err.name in ("textops", "textops.cli"):
            return None
        raise
    import typer

    (app,) = [v for v in vars(cli).values() if isinstance(v, typer.Typer)]
    return set(typer.main.get_command(app).commands)


def test_every_textops_subcommand_named_exists():
    """`textops <word>` in any page's code is a subcommand of the real CLI (of the
    specification, until textops/cli.py exists)."""
    known = real_subcommands() or SPEC_SUBCOMMANDS
    named = mentioned(r"(?<![\w./-])textops(?:[ \t]+(?:-v|--verbose))?[ \t]+([a-z][\w-]*)")
    unknown = {word: sorted(where) for word, where in named.items() if word not in known}
    assert not unknown, f"`textops` has no such subcommand: {unknown} (it has {sorted(known)})"


def test_every_subcommand_is_documented():
    """Each subcommand of the real CLI has a section of docs/cli.md."""
    known = real_subcommands()
    if known is None:
        pytest.skip("textops/cli.py does not exist yet")
    headings = " ".join(re.findall(r"^##+ (.+)$", (DOCS / "cli.md").read_text(), re.M))
    missing = sorted(c for c in known if not re.search(rf"\b{c}\b", headings))
    assert not missing, f"docs/cli.md has no section for textops {missing}"


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = mentioned(r"(?<![\w./-])make[ \t]+([a-z][\w-]*)")
    unknown = {word: sorted(where) for word, where in named.items() if word not in targets}
    assert not unknown, f"the Makefile has no such target: {unknown}"
