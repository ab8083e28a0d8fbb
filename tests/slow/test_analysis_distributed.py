"""Out of core and on a cluster: the analyses give the same numbers on a two-worker dask LocalCluster."""

import dask
import distributed
import numpy as np

import streamtap as st

from _analysis_util import tap_forward


def _results(ds):
    return {
        "dla": st.analysis.direct_logit_attribution(ds, 5, foil=2),
        "stream": st.analysis.residual_stream(ds, sites=("attn", "mlp")),
        "lens": st.analysis.logit_lens(ds, k=3, target=7).top_logit,
        "empty": st.analysis.empty_messages(ds, n_tokens=2).relative_norm,
        "acc": st.analysis.accumulation_pca(ds).explained_variance_ratio,
        "errors": st.invariant.errors(ds),        # what st.verify computes, lazily
    }


def test_two_worker_cluster_matches_local_threads(tmp_path):
    t = tap_forward("gpt2", store=str(tmp_path / "s.zarr"), lengths=[11, 9, 7, 5], chunks={"token": 6})
    ds = t.ds
    assert len(ds["resid_final"].data.chunks[0]) >= 5        # several blocks, so both workers get work
    local = dict(zip(_results(ds), dask.compute(*_results(ds).values(), scheduler="threads")))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        remote = dict(zip(_results(ds), dask.compute(*_results(ds).values())))
        verified = st.verify(ds)                  # st.verify itself, on the cluster
        workers = client.run(lambda: 1)
        assert len(workers) == 2
    for key in local:
        np.testing.assert_allclose(remote[key].values, local[key].values, rtol=1e-6, atol=1e-6, err_msg=key)
    assert float(remote["errors"].max()) <= 1e-5
    np.testing.assert_allclose(verified.values, local["errors"].values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(remote["dla"].sum("component").values, t.logits[:, 5] - t.logits[:, 2],
                               atol=2e-5 * np.abs(t.logits).max())
