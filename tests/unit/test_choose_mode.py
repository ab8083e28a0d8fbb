"""How ``writer="auto"`` picks a pipeline (streamtap.io.pipeline.choose_mode)."""

import pytest
import torch

from streamtap.io import pipeline as writer_mod


def test_auto_mode_follows_spare_cores_and_the_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(writer_mod, "spare_cores", lambda: 0)
    assert writer_mod.choose_mode("auto", cpu) == "inline"
    assert writer_mod.choose_mode("auto", torch.device("cuda")) == "thread"
    monkeypatch.setattr(writer_mod, "spare_cores", lambda: 3)
    assert writer_mod.choose_mode("auto", cpu) == "thread"
    assert writer_mod.choose_mode("inline", torch.device("cuda")) == "inline"
    # what st.tap says for an unknown mode is tests/integration/test_pipeline.py
    with pytest.raises(ValueError, match="writer must be one of"):
        writer_mod.choose_mode("process", cpu)


def test_spare_cores_are_the_cores_torch_leaves(monkeypatch):
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert writer_mod.spare_cores() == max(0, cores - 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores + 4)
    assert writer_mod.spare_cores() == 0
