"""The HTML report: written from a store alone, from the command line. (Rendered by a real headless Chromium:
tests/slow/test_report_chromium.py.)"""

import pytest
from click.testing import CliRunner

from streamtap.cli import cli

from _util import report_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return report_store(tmp_path_factory.mktemp("report") / "run.zarr")


def test_report_from_the_command_line(store, tmp_path):
    path, _ = store
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["report", str(path), "--out", str(out), "--words", "the,king,queen"])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    # the store alone carries every weight the report needs (W_Q, W_K, W_V, W_E included)
    assert "Not available" not in page and "W_Q" in page
    assert page.count("<img ") == 6
    for name in ("store", "attribution_top", "logit_lens", "empty_heads", "accumulation"):
        assert (out / "data" / f"{name}.csv").exists(), name
