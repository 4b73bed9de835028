"""report.html: self-contained (every image a PNG data URI, nothing fetched), with the run summary,
the phase table, training curves, each phase's figures and the model lineage, and the files each
figure was drawn from named under it. Rendered in headless Chromium when it is installed. The
figure conventions: an empty axis says so, counted axes tick at whole numbers, the lineage reads
top to bottom, and BitNet's speed chart says where the time goes."""

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agentforge import pipeline, rundir
from agentforge.figures import integer_ticks, mark_empty
from agentforge.figures.bitnet import speed_note
from agentforge.report import _fmt, lineage_figure, write_report
from pipeline_helpers import TEST_PHASES

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The parts of a report the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.captions, self.external = [], [], [], []
        self._caption = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe") or (tag != "img" and ("src" in attrs or "href" in attrs)):
            self.external.append((tag, attrs))
        if tag == "figcaption":
            self._caption = ""

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self.captions.append(self._caption)
            self._caption = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption += data


def check_report(run_dir: Path) -> Page:
    """The structure every report must have; returns the parsed page for more checks."""
    page = Page((run_dir / "report.html").read_text())
    assert page.sections == ["verdicts", "summary", "phases", "training", "phase-figures", "lineage", "config"]
    assert page.external == []  # self-contained: no scripts, stylesheets or links to fetch
    assert page.images and len(page.images) == len(page.captions)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    for caption in page.captions:  # every figure names the files it came from, and they exist
        sources = caption.split("Source: ", 1)[1].split(", ")
        assert all((run_dir / source).is_file() for source in sources), caption
    return page


def screenshot(report: Path, out: Path) -> Path | None:
    """A full-page PNG of the report from headless Chromium, or None when it is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return None
    # --no-sandbox: tests run as root in containers; the --disable-* and --no-first-run flags keep
    # Chromium from reaching for the network (updates, sync) on a machine that has none
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={out}",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return out


def assert_rendered(png: Path) -> None:
    """Chromium drew a page with content: a 1200-pixel-wide image that is not one flat colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[1] == 1200
    assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.05


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    pipeline.execute(
        pipeline.prepare(out=run_dir, preset="micro", phases=TEST_PHASES),
        progress=False,
        say=lambda _: None,
        on_change=write_report,
    )
    return run_dir


def test_the_report_is_self_contained_and_traces_every_figure(run_dir):
    page = check_report(run_dir)
    text = (run_dir / "report.html").read_text()
    assert "02-polish: training loss per stage" in text  # the polish phase trains
    curve = next(c for c in page.captions if c.startswith("02-polish: training loss per stage"))
    assert curve.endswith("Source: 02-polish/train/train/metrics.jsonl")
    assert "Gradient norm per step. Source: 02-polish/train/train/metrics.jsonl" in page.captions  # polish's own
    assert any(c.startswith("Model lineage") and c.endswith("registry.sqlite") for c in page.captions)


def test_the_phase_table_and_lineage_show_every_phase_and_model(run_dir):
    text = (run_dir / "report.html").read_text()
    assert text.count("<td class=completed>completed</td>") == 2
    assert "<td>polish/model</td>" in text and "<td>seedling/model</td></tr>" in text  # polish's parent


def test_the_report_is_rebuilt_from_disk(run_dir):
    before = (run_dir / "report.html").read_text()
    (run_dir / "report.html").unlink()
    write_report(run_dir, TEST_PHASES)
    after = (run_dir / "report.html").read_text()
    assert Page(after).sections == Page(before).sections and len(after) == pytest.approx(len(before), rel=0.05)


def test_a_run_with_no_completed_phase_still_reports(tmp_path):
    run = pipeline.prepare(out=tmp_path / "empty", preset="micro", phases=TEST_PHASES, stop="seedling")
    (tmp_path / "empty").mkdir()  # a run as it looks before its first phase completes
    rundir.write_run(tmp_path / "empty", {**run.info, "status": "running"})
    text = write_report(tmp_path / "empty", TEST_PHASES).read_text()
    assert "No training metrics yet." in text and "No models registered yet." in text


def test_chromium_renders_the_report(run_dir, tmp_path):
    png = screenshot(run_dir / "report.html", tmp_path / "report.png")
    if png is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); the structure is checked without it")
    assert_rendered(png)


# ---------------------------------------------------------------------------------------------
# figure conventions


def notes(ax) -> list[str]:
    return [text.get_text() for text in ax.texts]


def test_an_axis_that_shows_nothing_says_why():
    from matplotlib.figure import Figure

    fig = Figure()
    empty, zeros, flat_line, bars = fig.subplots(1, 4)
    zeros.bar(["a", "b"], [0.0, 0.0], yerr=[[0, 0], [0, 0]])
    flat_line.plot([0, 1, 2], [3.0, 3.0, 3.0])
    bars.bar(["a", "b"], [0.0, 0.5])
    mark_empty(fig)
    assert notes(empty) == ["no data"]
    assert notes(zeros) == ["every value is 0"]
    assert notes(flat_line) == [] and notes(bars) == []  # a flat line and one nonzero bar are visible


def test_a_counted_axis_ticks_whole_numbers_even_for_one_value():
    from matplotlib.figure import Figure

    fig = Figure()
    single, several = fig.subplots(1, 2)
    single.plot([6], [5.4], ".")
    several.plot([5, 6], [1.0, 2.0])
    for ax in (single, several):
        integer_ticks(ax.xaxis)
    fig.canvas.draw()
    for ax in (single, several):
        shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert shown and all(float(t).is_integer() for t in shown)
    assert 6 in single.get_xticks()


def pipeline_models() -> list[dict]:
    """The registry rows of a full run's lineage (as `agentforge models` lists them)."""
    rows = [
        ("cognate/trunk", []),
        ("cognate/reasoning", ["cognate/trunk"]),
        ("cognate/memory", ["cognate/trunk"]),
        ("cognate/speed", ["cognate/trunk"]),
        ("evomerge/champion", ["cognate/reasoning", "cognate/memory", "cognate/speed"]),
        ("quietstar/model", ["evomerge/champion"]),
        ("bitnet/packed", ["quietstar/model"]),
        ("bitnet/latent", ["quietstar/model"]),
        ("curriculum/model", ["bitnet/latent"]),
        ("baking/model", ["curriculum/model"]),
        ("experts/model", ["baking/model"]),
        ("compression/artifact", ["experts/model", "bitnet/packed"]),
    ]
    return [
        {"id": mid, "phase": mid.split("/")[0], "parents": parents, "parameters": None if "artifact" in mid else 41_989}
        for mid, parents in rows
    ]


def test_the_lineage_reads_top_to_bottom_with_the_main_line_first():
    from matplotlib.patches import FancyArrowPatch

    models = pipeline_models()
    fig = lineage_figure(models)
    ax = fig.axes[0]
    where = {t.get_text().split()[0]: t.get_position() for t in ax.texts}
    assert [where[m] for m in ("cognate/trunk", "cognate/reasoning", "evomerge/champion")] == [(0, 0), (0, -1), (0, -2)]
    # latent, whose line continues to the artifact, stands on the main line; packed beside it
    assert where["bitnet/latent"] == (0, -4) and where["bitnet/packed"] == (1, -4)
    assert where["compression/artifact"] == (0, -8)
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == sum(len(m["parents"]) for m in models)
    bent = [
        a for a in arrows if "rad=0.0" not in str(a.get_connectionstyle().__dict__) and a.get_connectionstyle().rad != 0
    ]
    assert len(bent) == 1  # packed -> artifact skips four rows: it bends around the boxes between
    width, height = fig.get_size_inches() * 100
    assert width <= 1100 and height >= 0.6 * len({y for _, y in where.values()}) * 100  # fits the page; rows legible


def test_a_negative_zero_shows_as_zero():
    assert (_fmt(-0.0), _fmt(-0.03277), _fmt(1.0802)) == ("0", "-0.03277", "1.08")


def speed(fp_b1, packed_b1, fp_share, packed_share) -> dict:
    return {
        "fp": {"tokens_per_s_b1": fp_b1, "tokens_per_s_b2": 2 * fp_b1, "layer_time_share": fp_share},
        "packed": {"tokens_per_s_b1": packed_b1, "tokens_per_s_b2": 2 * packed_b1, "layer_time_share": packed_share},
    }


SIZES = {
    "layers": {
        "a": {"weights": 2048, "out_features": 32, "in_features": 64},
        "b": {"weights": 1024, "out_features": 32, "in_features": 32},
    }
}


def test_the_speed_chart_says_where_the_time_goes():
    slower = speed_note(speed(246.0, 231.5, 0.1202, 0.1808), SIZES)
    assert slower.startswith(
        "Packed is slower at batch 1, 2. The converted layers take 12% of the float model's "
        "batch-1 generation time (0.49 ms per token) and 18% of the packed model's (0.78 ms): "
        "at these matrix sizes (2,048 weights at most) a packed call's fixed cost"
    )
    elsewhere = speed_note(speed(246.0, 231.5, 0.20, 0.10), SIZES)
    assert elsewhere.startswith("Packed is slower at batch 1, 2, though not in the converted layers.")
    faster = speed_note(speed(100.0, 300.0, 0.6, 0.2), SIZES)
    assert faster == (
        "The converted layers take 60% of the float model's batch-1 generation time (6.00 ms per "
        "token) and 20% of the packed model's (0.67 ms): the most that faster kernels for them can save."
    )
    old = speed(1.0, 1.0, 0.1, 0.1)
    del old["fp"]["layer_time_share"]
    assert speed_note(old, SIZES) is None
