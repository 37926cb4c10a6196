"""The study page in a real browser: headless Chromium opens the committed c3-digits study's
``report.html`` (written into a copy), and the test checks that every image decoded, the cell
table sorts by a clicked column and filters by text, and the page made no network request.

    python -m pytest -q -m slow tests/test_report_browser.py

Needs Debian's Chromium (``apt-get install -y chromium``); skips with that reason without it.
The page's screenshot is written to ``$HARNESS_SCREENSHOT`` when set (to look at it), else into
the test's temporary folder. The browser is driven through the DevTools protocol over a pipe
(``tests/cdp.py``): no websocket client, no driver binary.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from cdp import Browser

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHROMIUM = "/usr/bin/chromium"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} missing: apt-get install -y chromium")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``harness report`` of the committed c3-digits study, run on a copy of its results."""
    tmp = tmp_path_factory.mktemp("browser")
    root = str(tmp / "c3-digits")
    shutil.copytree(os.path.join(ROOT, "results", "c3-digits"), root,
                    ignore=shutil.ignore_patterns("cache", "ray"))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "report",
                          os.path.join(ROOT, "studies", "c3-digits.yaml"), "--results", root],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    path = os.path.join(root, "report.html")
    assert out.stdout.strip().splitlines()[-1] == path
    return tmp, path


def _column(b, s, i):
    return b.eval(s, "[...document.querySelectorAll('#cell-table tbody tr')]"
                     ".filter(r => !r.hidden)"
                     f".map(r => r.children[{i}].dataset.v ?? r.children[{i}].textContent)")


def test_page_in_headless_chromium(report):
    tmp, path = report
    shot = os.environ.get("HARNESS_SCREENSHOT") or str(tmp / "report.png")
    with Browser(CHROMIUM) as b:
        s = b.open("file://" + path, width=1200, height=900)
        b.screenshot(s, shot)
        # every figure decoded (a broken data URI leaves naturalWidth 0)
        imgs = b.eval(s, "[...document.images].map(i => [i.complete, i.naturalWidth])")
        figures = b.eval(s, "document.querySelectorAll('figure').length")
        assert len(imgs) == figures >= 8
        assert all(ok and w > 0 for ok, w in imgs), imgs
        # the cell table sorts by a clicked column: numbers ascending, then descending
        headers = b.eval(s, "[...document.querySelectorAll('#cell-table th')]"
                            ".map(h => h.textContent)")
        i = headers.index("final fd_digits_1k")
        click = f"document.querySelectorAll('#cell-table th')[{i}].click()"
        b.eval(s, click)
        up = [float(v) for v in _column(b, s, i)]
        assert len(up) == 72 and up == sorted(up)
        b.eval(s, click)
        down = [float(v) for v in _column(b, s, i)]
        assert down == sorted(up, reverse=True)
        loss = headers.index("loss")
        b.eval(s, f"document.querySelectorAll('#cell-table th')[{loss}].click()")
        names = _column(b, s, loss)
        assert names == sorted(names, key=str.lower)
        # ... and filters by text
        b.eval(s, "const f = document.querySelector('input[data-table=cell-table]');"
                  "f.value = 'ratio_js'; f.dispatchEvent(new Event('input', {bubbles: true}));")
        assert set(_column(b, s, loss)) == {"ratio_js"}
        assert b.eval(s, "document.getElementById('cell-table-count').textContent") == \
            "36 of 72 cells shown"
        time.sleep(0.5)  # anything the page might still start
        # no request left the page: the file itself and its inline data: images only
        urls = b.requests(s)
        assert urls and urls[0] == "file://" + path
        assert all(u.startswith("data:") for u in urls[1:]), [u[:80] for u in urls]
    assert os.path.getsize(shot) > 50_000
