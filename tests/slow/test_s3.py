"""Stores on S3-compatible object storage (s3:// URLs through fsspec and s3fs), against a real S3 API
server: moto's server mode, started on 127.0.0.1 by these tests."""

import logging
import random
import socket

import boto3
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import streamtap as st
from streamtap.cli import cli
from streamtap.io.lock import LOCK_KEY
from streamtap.models import tiny_model

from _crash import CORPUS, committed, kill_during_capture

BUCKET = "streamtap-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, with the environment s3fs reads pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)  # children (the crash harness) inherit them
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def _keys(prefix):
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def _local(tmp_path, corpus, batch_size=4, **kwargs):
    path = tmp_path / "local.zarr"
    st.capture(tiny_model("llama"), corpus, path, batch_size=batch_size, **kwargs)
    return st.open(path)


def _equal(ours, theirs):
    assert ours.attrs["committed_tokens"] == theirs.attrs["committed_tokens"]
    assert set(ours.variables) == set(theirs.variables)
    for name in theirs.variables:
        if name in ("head_output", "neuron_out"):
            continue  # derived from z and W_O, both compared
        np.testing.assert_array_equal(ours[name].values, theirs[name].values, err_msg=name)


def test_capture_open_verify_on_s3_equals_a_local_capture(s3, tmp_path):
    url = f"s3://{BUCKET}/plain.zarr"
    tap = st.capture(tiny_model("llama"), CORPUS[:12], url, batch_size=4)
    assert tap.sequences == 12
    assert f"plain.zarr/{LOCK_KEY}" not in _keys("plain.zarr/")  # the lock went with the writer
    assert "plain.zarr/zarr.json" in _keys("plain.zarr/")
    ds = st.open(url)
    st.verify(ds)
    _equal(ds, _local(tmp_path, CORPUS[:12]))
    # an append and an overwrite on object storage (no directories to remove)
    model = tiny_model("llama")
    with st.tap(model, url, append=True) as more:
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert more.sequences == 1 and st.open(url).attrs["committed_sequences"] == 13
    boto3.client("s3").put_object(Bucket=BUCKET, Key="plain.zarr/leftover/c/0", Body=b"old")
    st.capture(model, CORPUS[:3], url, overwrite=True)
    assert st.open(url).attrs["committed_sequences"] == 3
    assert "plain.zarr/leftover/c/0" not in _keys("plain.zarr/")  # the old store went, key by key


def test_explicit_storage_options_instead_of_the_environment(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3}
    url = f"s3://{BUCKET}/options.zarr"
    st.capture(tiny_model("llama"), CORPUS[:5], url, batch_size=4, storage_options=options)
    ds = st.open(url, storage_options=options)
    st.verify(ds)
    _equal(ds, _local(tmp_path, CORPUS[:5]))
    with pytest.raises(st.StreamtapError, match="storage_options apply to URLs"):
        st.open(tmp_path / "local.zarr", storage_options=options)


def test_a_second_writer_on_s3_is_refused_by_a_conditional_put(s3):
    url = f"s3://{BUCKET}/locked.zarr"
    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    with st.tap(model, url):
        model(input_ids=ids)
        assert f"locked.zarr/{LOCK_KEY}" in _keys("locked.zarr/")
        with pytest.raises(st.StoreLockedError, match="is being written by another streamtap writer"):
            with st.tap(model, url, append=True):
                model(input_ids=ids)
        model(input_ids=ids)
    assert st.open(url).attrs["committed_sequences"] == 2
    assert _keys("locked.zarr/") and f"locked.zarr/{LOCK_KEY}" not in _keys("locked.zarr/")


def test_resume_after_killed_writers_on_s3(s3, tmp_path):
    url = f"s3://{BUCKET}/killed.zarr"
    rng = random.Random(99)
    for _ in range(2):
        kill_during_capture(url, rng)
        assert f"killed.zarr/{LOCK_KEY}" in _keys("killed.zarr/")  # SIGKILL leaves the lock behind
        ds = st.open(url)
        assert ds.sizes["token"] == sum(len(t) for t in CORPUS[:committed(url)])
        st.verify(ds)
    done = committed(url)
    assert 0 < done < len(CORPUS)
    with pytest.warns(UserWarning, match="no longer runs"):
        st.capture(tiny_model("llama"), CORPUS, url, batch_size=2, resume=True)
    resumed = st.open(url)
    once = _local(tmp_path, CORPUS, batch_size=len(CORPUS))   # one batch: rounding apart (8e-7), as in batches
    np.testing.assert_array_equal(resumed.seq.values, once.seq.values)  # none duplicated, none missing
    np.testing.assert_array_equal(resumed.token_id.values, once.token_id.values)
    assert np.abs(resumed.z.values - once.z.values).max() <= 1e-5 * np.abs(once.z.values).max()
    st.verify(resumed)


def test_rank_stores_on_s3_open_as_one(s3, tmp_path):
    url = f"s3://{BUCKET}/dp.zarr"
    half = 4  # whole batches on each rank, so that both runs batch (and pad) every sequence alike
    st.capture(tiny_model("llama"), CORPUS[:half], f"{url}/rank-00000.zarr", batch_size=4)
    st.capture(tiny_model("llama"), CORPUS[half:2 * half], f"{url}/rank-00001.zarr", batch_size=4)
    combined = st.open(url)
    assert combined.attrs["ranks"] == 2
    single = _local(tmp_path, CORPUS[:2 * half])
    for name in ("seq", "pos", "token_id", "z", "resid_final"):
        np.testing.assert_array_equal(combined[name].values, single[name].values, err_msg=name)
    st.verify(combined)


def test_the_command_line_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from --storage-option alone
    text = tmp_path / "docs.txt"
    text.write_text("the quick brown fox\njumps over the lazy dog\nheads write messages\n")
    url = f"s3://{BUCKET}/cli.zarr"
    opt = ["--storage-option", f"endpoint_url={s3}"]
    runner = CliRunner()
    result = runner.invoke(cli, ["capture", "--model", "tiny:llama", "--text", str(text), "--out", url, *opt])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["capture", "--model", "tiny:llama", "--text", str(text), "--out", url, *opt])
    assert result.exit_code == 2 and "--resume to continue it" in result.stderr  # the store is found on S3
    result = runner.invoke(cli, ["verify", url, *opt])
    assert result.exit_code == 0 and "ok" in result.stdout, result.output
    result = runner.invoke(cli, ["info", url, *opt])
    assert result.exit_code == 0, result.output
    assert "tokens" in result.stdout and "KiB" in result.stdout and "sequences" in result.stdout
    result = runner.invoke(cli, ["report", url, "--out", str(tmp_path / "report"), *opt])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "index.html").exists()
    result = runner.invoke(cli, ["info", url, "--storage-option", "endpoint_url"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    assert zarr.open_group(url, mode="r", storage_options={"endpoint_url": s3}).attrs["committed_sequences"] == 3
