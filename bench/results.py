"""Results pages: what a benchmark measured, kept as JSON and shown in docs/results/.

A benchmark ends with `publish(Result(...))`: `bench/results/<name>.json` keeps the
measurement with its stamp (date, commit, CPU), and `docs/results/<name>.md` (with its
plots as PNG files) is rendered from that JSON. Pages are never edited by hand:

    python bench/results.py          # re-render every page and the index from the JSON

and the test suite checks that each page, and the README's summary table between its
`<!-- results summary -->` markers, equal what the JSON renders to, so a number in the
docs always has a measurement behind it. mkdocs.yml's Results section is written here
too, so a new page is in the site's navigation.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES = ROOT / "docs" / "results"
# Vector extensions that change which kernels PyTorch and ONNX Runtime run.
EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list]


@dataclass
class Plot:
    """A bar chart (x: category names) or a line chart (x: numbers), one series per key."""

    caption: str
    kind: str  # "bar" or "line"
    x_label: str
    y_label: str
    series: dict[str, list[list]]  # label -> [[x, y], ...]


@dataclass
class Result:
    name: str  # the file name: bench/results/<name>.json, docs/results/<name>.md
    title: str
    about: str  # markdown: what was measured, how, and how to run it again
    tables: list[Table]
    plots: list[Plot] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the raw measurement, for anyone re-reading it
    stamp: dict = field(default_factory=dict)
    # headline figures for the README's summary table: [what, figure] rows, or [what,
    # figure, measured on] where a merged page's figure is older than the page
    summary: list[list] = field(default_factory=list)
    # runs of several sessions, each with its own `measured` (run_stamp): the page's
    # stamp says when it was published, each row where it was measured
    merged: bool = False


def cpu() -> dict:
    """The CPU's model name, its vector extensions and the cores this process may use."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines
                  if line.startswith("flags")), [])
    return {"model": model, "extensions": [f for f in EXTENSIONS if f in flags],
            "cores": len(os.sched_getaffinity(0))}


def stamp() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    # what publishing itself rewrites does not make the measured code "changed", nor
    # does the pipeline's lock, which the `dvc repro` before a benchmark rewrites
    generated = [":!README.md", ":!mkdocs.yml", ":!docs/results", ":!bench/results",
                 ":!dvc.lock"]
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            ".", *generated], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return {"date": datetime.date.today().isoformat(), "commit": commit,
            "dirty": bool(dirty), "cpu": cpu()}


def run_stamp() -> dict:
    """A run's fields saying where it is measured, for a merged page: its `commit`
    ("+": with local changes) and `measured` (date, CPU). Take them when the repository
    copy is made, and spread them into the run."""
    now = stamp()
    return {"commit": now["commit"][:7] + ("+" if now["dirty"] else ""),
            "measured": {"date": now["date"], "cpu": now["cpu"]["model"]}}


def measured_on(run: dict) -> str:
    """A run's "date, CPU", as a merged page's rows and summary show it."""
    where = run.get("measured")
    return f"{where['date']}, {where['cpu']}" if where else "not recorded"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(table: Table) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join([f"**{table.caption}**", "", head, rule, *rows])


def stamp_line(s: dict) -> str:
    commit = s["commit"][:12] + (" with local changes" if s.get("dirty") else "")
    c = s["cpu"]
    extensions = f" ({', '.join(c['extensions'])})" if c["extensions"] else ""
    return (f"Measured on {s['date']} at commit `{commit}`, {c['model']}{extensions}, "
            f"{c['cores']} cores.")


def plot_file(name: str, index: int) -> str:
    return f"{name}-{index + 1}.png"


def render_plot(plot: Plot, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axes = figure.subplots()
    if plot.kind == "bar":
        labels = list(plot.series)
        categories = [str(x) for x, _ in next(iter(plot.series.values()))]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            heights = [y for _, y in plot.series[label]]
            axes.bar([c + i * width for c in range(len(categories))], heights, width,
                     label=label)
        axes.set_xticks([c + width * (len(labels) - 1) / 2 for c in range(len(categories))],
                        categories)
    else:
        for label, points in plot.series.items():
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    axes.set_xlabel(plot.x_label)
    axes.set_ylabel(plot.y_label)
    axes.set_title(plot.caption)
    if len(plot.series) > 1:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, format="png", metadata={"Software": None})


def page(result: Result) -> str:
    stamped = stamp_line(result.stamp)
    if result.merged:
        stamped = (stamped.replace("Measured on", "Last published on", 1)
                   + " Each row was measured where its own date, commit and CPU say.")
    parts = [f"# {result.title}", "", stamped, "", result.about.strip(), ""]
    for table in result.tables:
        parts += [markdown_table(table), ""]
    for i, plot in enumerate(result.plots):
        parts += [f"![{plot.caption}]({plot_file(result.name, i)})", ""]
    parts.append(f"Generated by `bench/results.py` from `bench/results/{result.name}.json`.")
    return "\n".join(parts) + "\n"


def index(results: list[Result]) -> str:
    rows = [[f"[{r.title}]({r.name}.md)", r.stamp["date"], f"`{r.stamp['commit'][:8]}`",
             r.stamp["cpu"]["model"]] for r in sorted(results, key=lambda r: r.title)]
    table = Table("Pages", ["page", "measured", "commit", "CPU"], rows)
    return ("# Results\n\nEvery page here is rendered from a benchmark's JSON in "
            "`bench/results/` (`python bench/results.py`); each benchmark in `bench/` "
            "says how to run it again. Figures from another machine or commit are not "
            "comparable: ratios are measured against a baseline in the same run.\n\n"
            + markdown_table(table) + "\n")


SUMMARY_START, SUMMARY_END = "<!-- results summary -->", "<!-- /results summary -->"


def summary_table(results: list[Result]) -> str:
    rows = [[what, cell(figure), f"[{r.title}](docs/results/{r.name}.md)",
             where[0] if where else f"{r.stamp['date']}, {r.stamp['cpu']['model']}"]
            for r in sorted(results, key=lambda r: r.title)
            for what, figure, *where in r.summary]
    table = Table("Measured", ["what", "figure", "details", "measured on"], rows)
    return "\n".join(markdown_table(table).splitlines()[2:])  # no caption in the README


def with_summary(readme: str, results: list[Result]) -> str:
    """The README with the block between the summary markers rendered from `results`."""
    if SUMMARY_START not in readme or SUMMARY_END not in readme:
        return readme
    head, rest = readme.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    return f"{head}{SUMMARY_START}\n{summary_table(results)}\n{SUMMARY_END}{tail}"


NAV_START, NAV_END = "  # results nav:", "  # end of results nav"


def with_nav(mkdocs: str, results: list[Result]) -> str:
    """mkdocs.yml with its Results section listing every page (between the markers)."""
    if NAV_START not in mkdocs or NAV_END not in mkdocs:
        return mkdocs
    head, rest = mkdocs.split(NAV_START, 1)
    marker_line, rest = rest.split("\n", 1)
    _, tail = rest.split(NAV_END, 1)
    # a title is a YAML key: quoted (as JSON, which YAML reads), so a colon in it is text
    entries = [f"      - {json.dumps(r.title)}: results/{r.name}.md"
               for r in sorted(results, key=lambda r: r.title)]
    section = "\n".join(["  - Results:", "      - results/index.md", *entries])
    return f"{head}{NAV_START}{marker_line}\n{section}\n{NAV_END}{tail}"


def load(path: Path) -> Result:
    raw = json.loads(path.read_text())
    try:
        return Result(**{**raw, "tables": [Table(**t) for t in raw["tables"]],
                         "plots": [Plot(**p) for p in raw.get("plots", [])]})
    except (KeyError, TypeError) as error:
        raise SystemExit(f"{path}: not a results file ({error})") from error


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def render_all() -> list[Path]:
    """Every page and the index from bench/results/*.json; returns the pages written."""
    PAGES.mkdir(parents=True, exist_ok=True)
    results = [load(path) for path in sorted(RESULTS.glob("*.json"))]
    written = []
    for result in results:
        for i, plot in enumerate(result.plots):
            render_plot(plot, PAGES / plot_file(result.name, i))
        write_text(PAGES / f"{result.name}.md", page(result))
        written.append(PAGES / f"{result.name}.md")
    write_text(PAGES / "index.md", index(results))
    # the repository the pages belong to (docs/results/ -> the root), which a run into
    # a scratch directory does not touch
    readme, mkdocs = PAGES.parent.parent / "README.md", PAGES.parent.parent / "mkdocs.yml"
    if readme.exists():
        write_text(readme, with_summary(readme.read_text(encoding="utf-8"), results))
    if mkdocs.exists():
        write_text(mkdocs, with_nav(mkdocs.read_text(encoding="utf-8"), results))
    return written


def publish(result: Result) -> Path:
    """Stamp the result, keep it as JSON, and re-render the pages; returns the page."""
    result.stamp = result.stamp or stamp()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{result.name}.json", json.dumps(asdict(result), indent=2) + "\n")
    render_all()
    return PAGES / f"{result.name}.md"


if __name__ == "__main__":
    for written in render_all():
        print(written.relative_to(ROOT), file=sys.stderr)
