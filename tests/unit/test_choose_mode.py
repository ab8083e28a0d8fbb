"""How ``writer="auto"`` picks a pipeline (streamtap.io.pipeline.choose_mode)."""

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
