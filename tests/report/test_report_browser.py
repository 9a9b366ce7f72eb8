"""The report in a real headless browser (Chromium): it loads offline, the tables and images are
there, every image decodes, nothing hostile runs, and a screenshot is not blank.

Needs Chromium (``.ci/install-chromium.sh``; Debian: ``apt-get install -y chromium``); skipped
without it. Run alone with ``pytest -m browser``.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from report_synth import XSS, make_store

from devicediff.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (install: .ci/install-chromium.sh)"),
]

PNG = b"\x89PNG\r\n\x1a\n"


def chromium(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no name resolves
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("browser")
    store = make_store(d / "s.db", d / "files", seeds=4)
    path = write_report(store, d / "out")
    store.close()
    return path


def test_dom_has_tables_images_and_no_script(report, tmp_path):
    r = chromium(tmp_path, "--dump-dom", report.as_uri())
    dom = r.stdout
    assert r.returncode == 0 and "</html>" in dom, r.stderr[-2000:]
    assert "<script" not in dom.lower()  # the hostile config name stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and XSS not in dom
    # the verdict table, with its rows
    assert re.search(r"<th[^>]*>p \(Holm\)</th>", dom)
    # 3 compared configs x 4 metrics (1 primary, 3 secondary); the hostile name is bitwise identical
    verdicts = re.findall(r'<td class="verdict (?:ok|bad|warn)">(equivalent|differs|inconclusive|identical)</td>', dom)
    assert len(verdicts) == 12 and verdicts.count("identical") == 4, verdicts
    # every figure is an <img> with a data: URI that decodes to a PNG
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', dom)
    assert len(srcs) >= 8
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG)


def test_images_decode_in_the_browser(report, tmp_path):
    """A copy of the page with a probe script (the report itself has none) records, after load,
    how many images the browser could not decode."""
    probe = tmp_path / "probe.html"
    page = report.read_text(encoding="utf-8")
    script = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
              " document.body.setAttribute('data-images', imgs.length);"
              " document.body.setAttribute('data-broken', imgs.filter(i => !i.complete || i.naturalWidth === 0).length);"
              " });</script>")
    probe.write_text(page.replace("</body>", script + "</body>"), encoding="utf-8")
    r = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', r.stdout)
    assert m, r.stdout[:500] + r.stderr[-2000:]
    assert int(m.group(1)) >= 8 and int(m.group(2)) == 0


def test_screenshot_is_not_blank(report, tmp_path):
    from matplotlib import image as mpimg

    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    a = mpimg.imread(shot)[..., :3]
    assert a.shape[:2] == (2400, 1280)
    ink = (a.mean(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.8, ink
    assert np.unique((a * 255).astype(np.uint8).reshape(-1, 3), axis=0).shape[0] > 50  # colours, figures: a page
