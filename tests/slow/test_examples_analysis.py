"""The analysis examples run as a user would run them, on the real SmolLM2, at small size."""

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def test_attribute_paris(tmp_path, monkeypatch, capsys):
    out = _run("attribute_paris.py", ["--out", str(tmp_path)], monkeypatch, capsys)
    assert '" Paris" logit at "The capital of France is": model 17.37' in out
    assert "top 8 heads: L23H4" in out and "top 5 mlps: L29_mlp" in out
    assert (tmp_path / "paris_heatmap.png").stat().st_size > 10_000
    assert (tmp_path / "paris_lens.png").stat().st_size > 10_000


def test_relevance_maps(tmp_path, monkeypatch, capsys):
    out = _run("relevance_maps.py", ["--out", str(tmp_path), "--layers", "27-29"], monkeypatch, capsys)
    assert "3 layers x 9 heads" in out and "rotary model" in out
    assert "promotion  source ' France'  -> target ' Paris'  : strongest in L29H2" in out
    assert (tmp_path / "relevance.png").exists() and (tmp_path / "promotion.png").exists()


def test_effective_ranks(tmp_path, monkeypatch, capsys):
    out = _run("effective_ranks.py", ["--out", str(tmp_path)], monkeypatch, capsys)
    assert "d_head = 64" in out and out.count("\n") > 30
    assert "W_QK: below both factors' effective rank in" in out
    assert (tmp_path / "effective_rank.png").exists()


def test_empty_messages(tmp_path, monkeypatch, capsys):
    out = _run("empty_messages.py", ["--out", str(tmp_path), "--texts", "8"], monkeypatch, capsys)
    assert "245 tokens (8 first in their sequence) x 270 heads = 66,150 source messages" in out
    others, firsts = (float(x) for x in re.search(r"median (\S+) for the others, (\S+) for first", out).groups())
    assert 0.8 < others < 1.2 and firsts < 0.5                  # the first token sends small messages
    assert re.search(r"  0.1   others   0.0\d%   first tokens", out)
    assert "  sent by: ' the' " in out                          # the most frequent tokens send the near-empty ones
    assert out.count("than to the controls: ") == 4              # frequent and rare, corpus and merge ranks
    assert "frequency from the tokenizer's BPE merge ranks" in out
    assert "  isotropic control  n=" in out
    assert (tmp_path / "message_norms.png").exists()


def test_induction_heads(tmp_path, monkeypatch, capsys):
    out = _run("induction_heads.py", ["--out", str(tmp_path), "--length", "30", "--batch", "2", "--top", "3"],
               monkeypatch, capsys)
    loss = next(line for line in out.splitlines() if line.startswith("loss: first copy"))
    first, second = (float(x) for x in re.findall(r"copy (\d+\.\d+)", loss))
    assert first > 12 and first - second > 5                  # random tokens, then predicted by induction
    assert "top induction heads:      L18H6 0." in out
    assert "top previous-token heads: L16H0 0." in out
    assert "  induction       L18H6 0." in out and "  previous-token  L16H0 0." in out
    assert "max |streamtap - own| over all 270 heads" in out
    assert "same tokens without the BOS prefix" in out


def test_attention_sinks(tmp_path, monkeypatch, capsys):
    out = _run("attention_sinks.py", ["--out", str(tmp_path), "--texts", "4", "--show", "3"], monkeypatch, capsys)
    ours = int(re.search(r"on the first token > 0.8\): (\d+) of 270", out).group(1))
    own = int(re.search(r"output_attentions=True\): (\d+) sink heads", out).group(1))
    assert ours == own and 20 < ours < 80
    off = out.split("off on more than half their queries")[1].split("sink heads whose")[0]
    assert "  L18H8  sink mass 1.000, sink message 0.0" in off        # parked on a sink that sends ~nothing
    assert float(re.search(r"max \|streamtap - own\| sink mass (\S+)", out).group(1)) < 1e-5
    assert "per text: " in out


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_effects(tmp_path, monkeypatch, capsys):
    out = _run("effects.py", ["--out", str(tmp_path), "--texts", "2", "--layers", "18", "--ranks", "16"], monkeypatch, capsys)
    assert "1. head ablations, layers [18] (18 interventions)" in out
    assert "2. near-empty source messages" in out and "drop near-empty, renormalised" in out
    assert "all heads OV at 99%-energy rank" in out and "all heads QK rank 16" in out
    assert (tmp_path / "total_vs_direct.png").stat().st_size > 10_000


def test_paris_graph(tmp_path, monkeypatch, capsys):
    out = _run("paris_graph.py", ["--out", str(tmp_path), "--depth", "2"], monkeypatch, capsys)
    assert 'graph of the " Paris" logit at "The capital of France is"' in out and "model 17.3713" in out
    worst = float(re.search(r"largest \|sum of inputs - value\| / \|value\|: (\S+)", out).group(1))
    assert worst < 1e-4                                        # every expanded node's inputs sum to its value
    assert "  L23H4 @ ' is'" in out and "what L23H4 moved" in out
    assert "  L0_mlp @ ' France'" in out                         # what the head moved came from " France"
    assert "why it attended to ' France' at 3" in out
    assert (tmp_path / "graph.html").stat().st_size > 5_000 and (tmp_path / "graph.json").exists()


def test_induction_circuit(tmp_path, monkeypatch, capsys):
    out = _run("induction_circuit.py", ["--out", str(tmp_path), "--queries", "6"], monkeypatch, capsys)
    assert "induction head L18H6" in out and "previous-token head L16H0" in out
    hits, n = (int(x) for x in re.search(r"strongest key-side term in (\d+) of (\d+) queries", out).groups())
    assert n == 6 and hits >= 5                               # K-composition: the key matches through L16H0
    lead, of = (int(x) for x in re.search(r"the largest single one is L0_mlp at j in (\d+) of (\d+) queries", out).groups())
    assert lead == of >= 4                                     # OV moves the attended token's extended embedding
