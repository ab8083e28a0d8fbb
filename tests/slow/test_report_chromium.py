"""The HTML report rendered by a real headless Chromium (a child process): nothing fetched from outside,
every image loads (the pattern sections' too), no figure has text outside it, no script error, a page is
painted."""

import re
import shutil
import subprocess

import pytest

import streamtap as st
from streamtap.report import write_report

from _util import report_store

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return report_store(tmp_path_factory.mktemp("report") / "run.zarr", patterns=True)


def _render(html_path, tmp_path):
    """Load the page in headless Chromium; returns (the DOM after load, a screenshot's path)."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=10000"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    subprocess.run(base + ["--window-size=1200,3000", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, check=True)
    return dom.stdout, dom.stderr, shot


def test_report_renders_in_headless_chromium(store, tmp_path):
    if CHROMIUM is None:  # a missing browser is a broken set-up, not a reason to pass quietly
        pytest.fail("Chromium is not installed: scripts/setup-env.sh installs it as root (Debian: apt-get install -y chromium)")
    path, _ = store
    ds = st.open(path)
    html_path = write_report(ds, tmp_path / "full", words=["the", "king", "queen", "england"])
    page = html_path.read_text()
    assert "Not available" not in page
    assert not re.search(r"""(src|href)=["']https?://""", page)        # nothing fetched from outside
    n_images = page.count("<img ")
    assert n_images == 10
    dom, stderr, shot = _render(html_path, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-rendered="ok"' in body, body
    assert f'data-images="{n_images}"' in body and 'data-broken=""' in body and 'data-errors=""' in body
    assert 'data-overflowing=""' in body                                  # no text outside any figure
    assert "Uncaught" not in stderr
    for heading in ("Direct logit attribution", "Logit lens", "Attention patterns", "Relevance and promotion",
                    "Effective ranks", "Empty messages", "Residual PCA", "accumulating prediction"):
        assert heading in dom
    for alt in ("logit lens grid", "head score grid", "attention heatmaps", "residual pca scree"):
        assert f'alt="{alt}"' in dom                                      # the new figures are on the page
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 3000 and pixels.std() > 0.05                # a page was painted, not a blank
