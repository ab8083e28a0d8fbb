"""Ctrl-C during a command-line capture (a child process), in both writer modes: the store opens,
verifies, and resumes to equal an uninterrupted capture."""

import re

import pytest
import zarr

from _cli_util import fields, invoke, number
from _util import lock_exists


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    """400 lines, and an uninterrupted capture of them with capture's default options: the store that a
    resumed one must equal. Made once, for both writers below (it does not depend on the writer)."""
    root = tmp_path_factory.mktemp("long")
    text = root / "long.txt"
    words = "the quick brown fox jumps over a lazy dog while heads write messages".split()
    text.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(3 + i % 9)) for i in range(400)))
    whole = root / "whole.zarr"
    assert invoke("capture", "--model", "tiny:llama", "--text", text, "--out", whole).exit_code == 0
    return text, whole


@pytest.mark.xdist_group("ctrl_c")  # in parallel runs, both on one worker: long_text is made once
@pytest.mark.parametrize("writer", ["inline", "thread"])
def test_ctrl_c_leaves_a_store_that_opens_verifies_and_resumes(writer, long_text, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import streamtap as st

    text, whole_store = long_text
    out = tmp_path / "run.zarr"
    args = ["capture", "--model", "tiny:llama", "--text", str(text), "--out", str(out), "--batch-size", "2"]
    # a suite started in the background by a shell without job control (`nohup ./test.sh &`) inherits
    # SIGINT ignored, and so would the child: give it the terminal's default, as a Ctrl-C finds it
    child = subprocess.Popen([sys.executable, "-m", "streamtap.cli", *args, "--writer", writer],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def committed():
        try:
            return int(zarr.open_group(out, mode="r").attrs["committed_sequences"])
        except Exception:
            return 0

    deadline = time.monotonic() + 120
    while committed() < 10 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0
    message = re.search(r"interrupted; the store is consistent with (\d+) sequences committed.*--resume", stderr)
    assert message, stderr
    done = int(message.group(1))
    assert 10 <= done < 400 and done == committed()
    assert not lock_exists(out)
    ds = st.open(out)
    assert ds.sizes["token"] == ds.attrs["committed_tokens"]
    st.verify(ds)

    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert number(fields(result.stdout)["sequences"]) == 400 - done
    resumed, whole = st.open(out), st.open(whole_store)
    for name in ("seq", "pos", "token_id"):
        assert (resumed[name].values == whole[name].values).all(), name
    st.verify(resumed)
