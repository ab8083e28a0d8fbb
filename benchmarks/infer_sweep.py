"""Quick inference sweep: every causal-LM type of the installed transformers without a family file,
built tiny (``coverage_sweep.build``), opened with ``st.tap``: does inference prove a layout, and are
its queries and keys proven too?

    python benchmarks/infer_sweep.py [--timeout 60] [--out benchmarks/results/infer_sweep.json]

Classes: ``proven+qk`` (terms and attention proven: W_Q/W_K/W_V stored, patterns served),
``proven`` (terms proven, queries/keys not: no W_Q/W_K/W_V, patterns refused with the measured error),
``refused`` (no inferred layout adds up, or inference cannot read the module tree), ``not-tiny``
(the tiny model could not be built). The exactness of what is tapped is the coverage sweep's job
(benchmarks/coverage_sweep.py checks it against the model's hidden states).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def classify(model_type: str) -> tuple[str, str]:
    import torch
    import zarr

    import streamtap as st
    from coverage_sweep import build
    from streamtap.errors import InferredLayoutWarning, StreamtapError

    try:
        model, _ = build(model_type, "causal", torch.float32)
    except Exception as exc:  # noqa: BLE001 - the type cannot be built tiny: recorded as such
        return "not-tiny", f"{type(exc).__name__}: {str(exc)[:160]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InferredLayoutWarning)
        try:
            with st.tap(model, zarr.storage.MemoryStore()):
                pass
        except StreamtapError as exc:
            return "refused", f"{type(exc).__name__}: {str(exc)[:200]}"
    said = [str(w.message) for w in caught if issubclass(w.category, InferredLayoutWarning)]
    if not said:
        return "family", ""
    return ("proven+qk" if "queries and keys proven" in said[0] else "proven"), said[0][:400]


def main(argv=None) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from streamtap.layouts import supported_model_types

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "infer_sweep.json"))
    args = parser.parse_args(argv)
    known = set(supported_model_types())
    results = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type in known:
            continue
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("timed out")))
        signal.alarm(args.timeout)
        try:
            results[model_type] = classify(model_type)
        except TimeoutError:
            results[model_type] = ("hung", f"over {args.timeout} s")
        except Exception as exc:  # noqa: BLE001 - recorded: a crash of one type is its result
            results[model_type] = ("crashed", f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            signal.alarm(0)
        print(model_type, results[model_type][0], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    print(dict(Counter(c for c, _ in results.values())))


if __name__ == "__main__":
    main()
