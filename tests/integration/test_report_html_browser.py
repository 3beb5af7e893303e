"""The HTML report in a real browser: headless Chromium draws every figure, offline.

Needs Debian's `chromium` (installed here with apt-get when missing, hence root).
The screenshot is kept as a CI artifact: test-artifacts/report.png under the repo
($PGTRACE_TEST_ARTIFACTS overrides the directory).
"""

from __future__ import annotations

import html as htmllib
import io
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pgtrace.report.html import render_html
from tests.unit.test_report_html import synthetic_frame, synthetic_header

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
    # any name lookup fails: the page must not need the network
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
RESULT_ID = "pgtrace-test-result"
#: Injected first into <head> of a copy of the page: records errors, then the state of
#: every figure in a <pre> that --dump-dom shows.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push('error: ' + (e.message || (e.target && e.target.outerHTML) || e));
}, true);
window.addEventListener('unhandledrejection', function (e) {
  window.__errors.push('unhandled rejection: ' + e.reason);
});
(function () {
  var orig = console.error;
  console.error = function () {
    window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return orig.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  setTimeout(function () {
    var figs = [];
    document.querySelectorAll('div.plotly-graph-div').forEach(function (d) {
      var r = d.getBoundingClientRect();
      figs.push({
        id: d.id,
        traces: (d.data || []).length,
        mainSvg: d.querySelectorAll('svg.main-svg').length,
        drawnTraces: d.querySelectorAll('g.trace').length,
        marks: d.querySelectorAll('g.point path, path.js-line').length,
        width: r.width, height: r.height
      });
    });
    var res = performance.getEntriesByType('resource').map(function (e) { return e.name; });
    var pre = document.createElement('pre');
    pre.id = '""" + RESULT_ID + """';
    pre.textContent = JSON.stringify({errors: window.__errors, figures: figs,
                                      resources: res, plotly: typeof Plotly});
    document.body.appendChild(pre);
  }, 1000);
});
</script>"""


def _install_chromium() -> str:
    """Debian's chromium; apt-get installs it when missing. Skip only if that fails."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                             capture_output=True, text=True, env=env, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium is not installed and apt-get install chromium failed: {exc}")
    found = shutil.which("chromium")
    if found is None:
        tail = " ".join((res.stderr or res.stdout).split()[-30:])
        pytest.skip(f"chromium is not installed and apt-get install chromium failed "
                    f"(exit {res.returncode}): {tail}")
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    return _install_chromium()


@pytest.fixture
def profile(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "chromium-profile"
    d.mkdir()
    yield d


def _chromium(binary: str, profile: Path, *args: str, timeout: float = 120) -> str:
    res = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert res.returncode == 0, f"chromium failed (exit {res.returncode}): {res.stderr[-2000:]}"
    return res.stdout


class _Figures(HTMLParser):
    """Per plotly div in a dumped DOM: how many svg.main-svg it holds."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.main_svg: dict[str, int] = {}
        self._current: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if self._current is None:
            if tag == "div" and "plotly-graph-div" in classes:
                self._current = a.get("id") or f"anonymous-{len(self.main_svg)}"
                self.main_svg[self._current] = 0
                self._depth = 1
            return
        if tag == "div":
            self._depth += 1
        if tag == "svg" and "main-svg" in classes:
            self.main_svg[self._current] += 1

    def handle_endtag(self, tag: str) -> None:
        if self._current is not None and tag == "div":
            self._depth -= 1
            if self._depth == 0:
                self._current = None


def _render(tmp_path: Path, items: list[tuple[str, Any, dict[str, Any]]], name: str) -> Path:
    out = io.StringIO()
    render_html(items, out)
    page = tmp_path / name
    page.write_text(out.getvalue(), encoding="utf-8")
    return page


def _check_in_browser(chromium: str, profile: Path, page: Path) -> dict[str, Any]:
    """Load a probed copy of the page, return what the probe saw; assert it all drew."""
    text = page.read_text(encoding="utf-8")
    probed = page.with_name("probed-" + page.name)
    probed.write_text(text.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    dom = _chromium(chromium, profile, "--virtual-time-budget=5000", "--dump-dom",
                    probed.as_uri())
    start = dom.find(f'<pre id="{RESULT_ID}">')
    assert start >= 0, "the probe never reported: the page did not finish loading"
    end = dom.index("</pre>", start)
    result: dict[str, Any] = json.loads(htmllib.unescape(dom[start + len(RESULT_ID) + 11:end]))
    assert result["errors"] == [], f"JavaScript errors: {result['errors']}"
    assert result["plotly"] == "object"
    remote = [r for r in result["resources"] if not r.startswith(("file:", "data:", "blob:"))]
    assert remote == [], f"the page loaded from the network: {remote}"
    expected = text.count('class="plotly-graph-div"')
    figs = result["figures"]
    assert len(figs) == expected >= 3
    for f in figs:
        assert f["mainSvg"] >= 1, f
        assert f["traces"] >= 1 and f["drawnTraces"] >= f["traces"], f
        assert f["marks"] > 0, f
        assert f["width"] > 300 and f["height"] > 300, f
    # and the plain check on the DOM itself: each plotly div holds an svg.main-svg
    parser = _Figures()
    parser.feed(dom)
    assert len(parser.main_svg) == expected
    assert all(n >= 1 for n in parser.main_svg.values()), parser.main_svg
    return result


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _artifacts() -> Path:
    d = Path(os.environ.get("PGTRACE_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_every_figure_draws_and_the_screenshot_is_saved(
    chromium: str, profile: Path, tmp_path: Path
) -> None:
    item = ("/captures/insert-bigint.pgtrace", synthetic_frame(), synthetic_header())
    page = _render(tmp_path, [item], "report.html")
    result = _check_in_browser(chromium, profile, page)
    timeline = next(f for f in result["figures"] if f["id"].endswith("timeline"))
    assert timeline["traces"] == 6  # tps, p50, p99, WAL FPI/s, CPU and IO pressure

    shot = _artifacts() / "report.png"
    shot.unlink(missing_ok=True)
    _chromium(chromium, profile, "--virtual-time-budget=5000", "--window-size=1400,3000",
              f"--screenshot={shot}", page.as_uri())
    assert _png_size(shot) == (1400, 3000)
    assert shot.stat().st_size > 100_000  # a blank page compresses to a few kB


def test_several_captures_with_a_run_draw(chromium: str, profile: Path, tmp_path: Path) -> None:
    items = [
        ("/captures/bigint.pgtrace", synthetic_frame(seed=1), synthetic_header()),
        ("/captures/uuidv4.pgtrace", synthetic_frame(n=3000, seed=2, run=True),
         synthetic_header(timeline=False, run=True)),
    ]
    page = _render(tmp_path, items, "compare.html")
    result = _check_in_browser(chromium, profile, page)
    assert len(result["figures"]) == 7
    shot = _artifacts() / "report-compare.png"
    shot.unlink(missing_ok=True)
    _chromium(chromium, profile, "--virtual-time-budget=5000", "--window-size=1400,3000",
              f"--screenshot={shot}", page.as_uri())
    assert _png_size(shot) == (1400, 3000)


def test_png_export(chromium: str, tmp_path: Path) -> None:
    """kaleido draws each figure with the same Chromium, offline."""
    pytest.importorskip("kaleido", reason="PNG export needs kaleido >= 1 (pip install -e .[dev])")
    items = [("/captures/run.pgtrace", synthetic_frame(n=1500, run=True),
              synthetic_header(run=True))]
    png = tmp_path / "png"
    render_html(items, io.StringIO(), png_dir=str(png))
    names = sorted(p.name for p in png.iterdir())
    assert names == ["01-buckets.png", "02-e2e-buckets.png", "03-percentiles.png",
                     "04-e2e-percentiles.png", "05-timeline.png"]
    for name in names:
        width, height = _png_size(png / name)
        assert width == 1200 and height >= 400, name
        assert (png / name).stat().st_size > 10_000, name
