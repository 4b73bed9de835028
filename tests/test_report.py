"""report.html: self-contained (every image a PNG data URI, nothing fetched), with the run summary,
the phase table, training curves, each phase's figures and the model lineage, and the files each
figure was drawn from named under it. Rendered in headless Chromium when it is installed."""
import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agentforge import pipeline, rundir
from agentforge.report import write_report
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
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,3000", f"--screenshot={out}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
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
    pipeline.execute(pipeline.prepare(out=run_dir, preset="micro", phases=TEST_PHASES), progress=False,
                     say=lambda _: None, on_change=write_report)
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
