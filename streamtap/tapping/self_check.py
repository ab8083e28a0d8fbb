"""The attach-time self-check: a short probe proves the layout right on the live model, or names where not.

When a tap opens, a probe of two sequences runs through the model (8 tokens, and a shorter one padded
on the tokenizer's side, so that padding is proven too; only real tokens count); its terms are replayed through the
stream (``streamtap.stream.replay``, the same replay ``decompose`` and ``verify`` use) in float64,
and the running sum is compared with the real input of every block and with the final residual.
Then the final residual is read out as the analyses read a store (the final norm with its frozen
scale, the unembedding and its bias, the layout's soft-cap) and compared with the model's own
logits, so a layout that misreads the head of the model (an unseen logit scale, a different final
norm) is refused like one that misreads a block. A failure names the first layer (or the head)
that does not add up, in milliseconds, instead of after hours of capture.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..errors import DecompositionError, StreamtapError
from ..invariant import relative_error, tolerance
from ..layouts import Weights
from ..stream import Embed, FrozenNorms, Piece, Sum, apply_norm, replay


def probe_norms(bound, scale: np.ndarray | None) -> FrozenNorms:
    """The bound layout's stream norms, frozen at the given per-token scales (token, norm)."""
    if not bound.norm_probes:
        return FrozenNorms.none()
    probes = bound.norm_probes
    return FrozenNorms(gamma=np.stack([p["gamma"].double().numpy() for p in probes]),
                       beta=np.stack([p["beta"].double().numpy() for p in probes]),
                       center=np.array([p["center"] for p in probes]), scale=scale)


def probe_batch(tap, n_tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the probe: a full row of ``n_tokens`` and a shorter row padded
    on the side the tap's tokenizer pads (right without one), so that the check also proves the
    layout where padding is, as in every real batch (learned positions that follow the mask,
    masks folded into biases); only real tokens are compared."""
    module = tap.module
    config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    vocab = int(getattr(config, "vocab_size", 2) or 2)   # a multimodal model's text tower holds the vocabulary
    n = min(n_tokens, tap.max_positions or n_tokens)
    device = next(module.parameters()).device
    ids = (torch.arange(n, device=device) % max(vocab - 1, 1) + 1)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    short = max(n - 3, 1) if n > 1 else n
    pad = torch.arange(n, device=device) >= short
    if getattr(tap.tokenizer, "padding_side", "right") == "left":
        pad = pad.flip(0)
    mask[1, pad] = 0
    ids[1, pad] = int(getattr(config, "pad_token_id", None) or 0) % max(vocab, 1)
    ids[1, ~pad] = ids[1, ~pad].flip(0)   # another sequence than row 0, not just a shorter copy
    return ids, mask


def self_check(tap, n_tokens: int = 8) -> float:
    """Replay the layout's stream on a short padded probe and compare it with each block's real input.

    Returns the largest relative error. Raises :class:`~streamtap.errors.DecompositionError` naming
    the first layer whose terms do not add up to the residual entering the next one (or to the final
    residual).
    """
    b, module = tap.bound, tap.module
    ids, mask = probe_batch(tap, n_tokens)
    blocks = [b.block_full_path(layer) for layer in range(b.n_layers)]
    terms, entering, logits = tap.probe(ids, blocks, mask)
    terms = {k: v.detach().double().cpu().numpy() for k, v in terms.items()}
    entering = [x.detach().double().cpu().numpy().reshape(-1, b.d_model) for x in entering]
    if not np.isfinite(terms["resid_final"]).all():
        # a broken model, not a broken layout: the first real batch reports where it goes non-finite
        warnings.warn("the model produced non-finite values on the self-check probe; layout check skipped",
                      stacklevel=3)
        return float("nan")
    W_O, b_O = (t.double().cpu().numpy() for t in Weights(b).output_projections())
    norms = probe_norms(b, terms.get("norm_scale"))
    model_dtype = str(next(module.parameters()).dtype).removeprefix("torch.")

    def source(event):
        if isinstance(event, Embed):
            return [Piece([event.var], terms[event.var][None])]
        if event.site == "attn":
            term = np.einsum("thd,hdm->tm", terms["z"][:, event.layer], W_O[event.layer]) + b_O[event.layer]
        elif event.site == "mixer":
            term = terms["mixer_out"][:, event.layer]
        elif event.experts:
            term = terms["expert_out"][:, event.layer].sum(axis=1)
            if event.shared:
                term = term + terms["shared_expert_out"][:, event.layer]
        else:
            term = terms["mlp_out"][:, event.layer]
        return [Piece([event.site], term[None])]

    # rounding error is bounded relative to the largest partial sum so far, not to the current one
    # (the residual can shrink by cancellation), so each token's scale is the running max
    state = {"scale": None, "worst": 0.0}

    def compare(total, reference, where: str, layer: int) -> None:
        err, state["scale"] = relative_error(total, reference, state["scale"])
        bound = tolerance(model_dtype, n_layers=max(layer, 1))
        if not err <= bound:
            raise _misfit(DecompositionError(
                f"layout {b.name!r} does not fit this {type(module).__name__}: {where} "
                f"(relative error {err:.3g}, bound {bound:.1g}). A module the layout names may have moved "
                "or a term may be missing; see docs/layouts.md. check=False skips this probe."
            ), where, layer, err, bound)
        state["worst"] = max(state["worst"], err)

    def on_enter(layer: int, site: str, acc: Sum) -> None:
        if site != "attn":
            return
        before = "the embedding terms" if layer == 0 else f"the terms written up to layer {layer - 1}"
        compare(acc.total, entering[layer], f"{before} do not add up to the residual entering layer {layer}", layer)

    acc = replay(b.events, norms, source, Sum(), on_enter=on_enter)
    compare(acc.total, terms["resid_final"], f"the terms of layer {b.n_layers - 1} and before do not add up "
            "to the final residual", b.n_layers)
    if logits is not None:
        state["worst"] = max(state["worst"], _check_logits(b, terms["resid_final"], logits, model_dtype))
    return state["worst"]


def prove_attention(tap, n_tokens: int = 8) -> tuple[object, float | str]:
    """Prove where an inferred layout's queries and keys come from, or say why not.

    Each reading of the attention (``layouts.infer.attention_readings``: fused split, rotary style
    and order) captures the probe with ``patterns=True`` into a store in memory; the patterns
    ``streamtap.attention`` recomputes from that store's W_Q, W_K, W_V, norms, scales and rotary
    tables must equal the model's own attention probabilities (where the model returns them: eager
    attention) and give back every head's stored output z within the model dtype's tolerance (1e-5
    in float32). Returns (the bound layout to use, its largest error) for the first reading proven;
    else (the bound layout without queries, keys and values, so no unproven W_Q/W_K/W_V is stored,
    why not, with the measured error).
    """
    from ..layouts import pattern_support
    from ..layouts.infer import attention_readings

    b = tap.bound
    if b.attn is None or not (b.attn.q or b.attn.qkv):
        return b, "inference located no query, key and value projections"
    b.attention_proof = 0.0   # every other reason pattern_support knows still applies
    why = pattern_support(b)
    b.attention_proof = None
    if why:
        return _without_qkv(b, why), why
    model_dtype = str(next(tap.module.parameters()).dtype).removeprefix("torch.")
    bound_ = tolerance(model_dtype, n_layers=b.n_layers)
    worst = []
    for reading in attention_readings(b.attn, b.positions()):
        trial = _with_attn(b, reading)
        try:
            err = _pattern_error(tap, trial, n_tokens)
        except (StreamtapError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
            worst.append(f"{type(exc).__name__}: {exc}")
            continue
        if err <= bound_:
            trial.attention_proof = err
            return trial, err
        worst.append(err)
    measured = min((e for e in worst if isinstance(e, float)), default=None)
    why = ("the patterns recomputed from its inferred queries and keys do not equal the model's on the self-check "
           "probe (" + (f"smallest error over {len(worst)} readings {measured:.3g}, bound {bound_:.1g}" if measured
                        is not None else str(worst[0])) + "), so W_Q, W_K and W_V are not stored; a family file declares "
           "them (see docs/layouts.md)")
    return _without_qkv(b, why), why


def _with_attn(b, attn):
    """``b`` with its attention step read as ``attn`` (the declaration shows the reading too)."""
    block = tuple(attn if step is b.attn else step for step in b.layout.block)
    out = dataclasses.replace(b, attn=attn, layout=dataclasses.replace(b.layout, block=block))
    out.norm_probes = b.norm_probes
    return out


def _without_qkv(b, why: str):
    """``b`` without queries, keys and values: nothing unproven is stored, patterns refused with ``why``."""
    out = _with_attn(b, dataclasses.replace(b.attn, q=None, k=None, v=None, qkv=None, no_patterns=why))
    out.attention_proof = why
    return out


def _pattern_error(tap, bound, n_tokens: int) -> float:
    """Capture the unpadded probe with ``bound`` and patterns into a store in memory; the largest
    difference between the patterns recomputed from it and the model's attention probabilities,
    and between each head's recomputed and stored output (relative to the token's largest |z|)."""
    import zarr

    from ..attention import output_errors, sequence_attention
    from ..dataset import open as open_store
    from ..io.writer import StoreWriter
    from ..options import CaptureOptions
    from .batch import Recorder

    ids, _ = probe_batch(tap, n_tokens)
    ids = ids[:1]
    real = torch.ones(ids.shape, dtype=torch.bool)   # on the host, as a capture's mask is
    writer = StoreWriter(zarr.storage.MemoryStore())
    options = CaptureOptions(patterns=True, writer="inline", compress=False)
    recorder = Recorder(bound, options, module=tap.module, writer=writer, model_name="self-check",
                        created_by="streamtap self-check")
    kwargs = {"input_ids": ids, "attention_mask": real.long().to(ids.device)}
    eager = getattr(tap.module.config, "_attn_implementation", None) == "eager"
    if eager:
        kwargs["output_attentions"] = True
    try:
        buffers = recorder.acquire()
        with torch.no_grad():
            slots = recorder.slots(real, buffers)
            output, kept = tap.traced((), kwargs, slots, recorder.keep)
            recorder.record(kept, slots, buffers, ids.cpu(), real.cpu())
        recorder.pipeline.close(None)
        writer.close()
    finally:
        recorder.close()
    ds = open_store(writer.target)
    err = float(output_errors(ds, 0).max())
    attentions = getattr(output, "attentions", None) if eager else None
    if attentions is not None and all(a is not None for a in attentions):
        for _, layer, one in sequence_attention(ds, [0]):
            theirs = attentions[layer][0, one.heads].detach().double().cpu().numpy()
            err = max(err, float(np.abs(one.pattern - theirs).max()))
    return err


def _check_logits(b, resid_final: np.ndarray, logits: torch.Tensor, model_dtype: str) -> float:
    """The logits the store's weights give from the final residual, against the model's own."""
    weights = Weights(b)
    final, unembedding = weights.final_norm(), weights.unembedding()
    if final is None or unembedding is None:
        return 0.0  # a head the store does not describe (masked-LM heads): no logits to attribute
    W_U, bias = unembedding
    gamma, beta = final["gamma"].double().numpy(), final["beta"].double().numpy()
    ours = apply_norm(resid_final, gamma, beta, final["center"], final["eps"])
    ours = ours @ W_U.double().cpu().numpy().T + (0.0 if bias is None else bias.double().cpu().numpy())
    cap = b.final_softcap()
    if cap:
        ours = cap * np.tanh(ours / cap)
    theirs = logits.detach().double().cpu().numpy()
    err = float(np.abs(ours - theirs).max() / max(float(np.abs(theirs).max()), 1e-30))
    bound = tolerance(model_dtype, n_layers=b.n_layers)
    if not err <= bound:
        raise _misfit(DecompositionError(
            f"layout {b.name!r} does not fit this {type(b.model).__name__}: the logits its final norm and "
            f"unembedding give from the final residual differ from the model's (relative error {err:.3g}, "
            f"bound {bound:.1g}); the model does something to the final residual or the logits that the "
            "layout does not declare (a logit scale, another final norm). Attributions would be wrong; "
            "see docs/layouts.md. check=False skips this probe."
        ), "the logits its final norm and unembedding give from the final residual differ from the model's",
            b.n_layers + 1, err, bound)
    return err


def _misfit(exc: DecompositionError, where: str, layer: int, err: float, bound: float) -> DecompositionError:
    """``exc`` with where the stream stopped adding up (``where``: the sentence; ``layer``: how far
    it got, the logits counting as past the last layer; the relative error and its bound), so that
    layout inference can name the closest of its candidates."""
    exc.where, exc.layer, exc.rel_error, exc.bound = where, layer, err, bound
    return exc


__all__ = ["self_check", "probe_norms", "probe_batch", "prove_attention"]
