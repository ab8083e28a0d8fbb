"""Capture only what the question needs: a selection of terms and tokens, and projections while capturing.

A selective capture (``layers=``, ``heads=``, ``terms=``, ``positions=``, ``project=``) still sees every
term of every stored token while the model runs; after the forward this module keeps what was asked for:

* tokens outside ``positions`` are dropped (the stored ones keep their ``seq`` and ``pos``); where nothing
  reads the others (no summaries) the hooks already copied only the stored ones (``keep_tokens``, before
  the forward), and ``apply`` is given ``keep=None``;
* what ``layers``/``heads``/``terms`` leave out is summed into one per-token ``rest`` term, each left-out
  term carried as it reaches the final residual (through its sublayer norm and every later stream norm,
  with the batch's frozen scales; the norms' betas stay components of their own). ``rest`` enters the
  replay last, right before the final norm, so ``decompose``/``verify`` add up on every stored token;
* ``project`` stores each component's contribution onto each direction (token x component x
  direction), computed by the same block function as ``direct_logit_attribution`` offline.

Nothing here knows an architecture: it replays the layout's recorded stream (``streamtap.stream``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import InputError, OptionError
from ..options import TERM_KINDS, CaptureOptions
from ..selection import REST, covered, selection_of  # noqa: F401 - the read side's half, re-exported
from ..stream import Embed, FrozenNorms, Labels, Piece, Sum, replay

LAYERED = {"z": "z", "mlp_out": "mlp_out", "mixer_out": "mlp_out", "neuron_act": "neurons", "expert_out": "mlp_out",
           "expert_index": "mlp_out", "shared_expert_out": "mlp_out"}
"""The per-token variables a selection cuts by layer, and the term kind (``terms=``) that keeps each: a
mixture's routed and shared experts are its MLP's terms."""


class Selection:
    """What one selective capture keeps of each batch, fixed when the tap opens.

    Construction checks everything that needs the model (layer and head indices, direction sizes,
    token strings), so bad input fails before the store is created.
    """

    def __init__(self, options: CaptureOptions, bound, tokenizer=None, vocab_size: int | None = None):
        self.options, self.bound = options, bound
        for name, limit in (("layers", bound.n_layers), ("heads", bound.n_heads)):
            bad = [i for i in getattr(options, name) or () if not 0 <= i < limit]
            if bad:
                raise OptionError(f"option {name}: index {bad[0]} does not exist; this model has {limit} {name} "
                                  f"(0..{limit - 1})")
        self.layers, self.heads = options.layers, options.heads
        kinds = options.terms
        if kinds is None:
            kinds = () if options.project else tuple(k for k in TERM_KINDS if k != "neurons" or options.neurons)
        self.kinds = kinds
        self.vectors = bool(kinds)                 # d_model terms stored at all
        self.directions = self._directions(options.project or {}, tokenizer, vocab_size)
        self.reads_logits = any(kind == "top" for kind, _ in self.directions.values())   # unembed_top ranks them
        self._weights = None
        self._made: dict = {}      # what is the same for every batch, made on first use

    # -- checks that need the model ----------------------------------------------------------------------
    def _directions(self, project: dict, tokenizer, vocab_size) -> dict:
        d_model = self.bound.d_model
        out = {}
        for name, what in project.items():
            if name == "unembed_top":
                out[name] = ("top", int(what))
            elif isinstance(what, int):
                out[name] = ("token", what)
            elif isinstance(what, str):
                if tokenizer is None:
                    raise OptionError(f"option project: direction {name!r} is the token string {what!r}; give the "
                                      "tap a tokenizer (tokenizer=...) to resolve it, or pass its id's vector")
                ids = tokenizer.encode(what, add_special_tokens=False)
                if len(ids) != 1:
                    raise OptionError(f"option project: {what!r} ({name!r}) is {len(ids)} tokens ({ids}), not one; "
                                      "use a string the tokenizer keeps whole (often with a leading space)")
                out[name] = ("token", int(ids[0]))
            else:
                if what.shape != (d_model,):
                    raise OptionError(f"option project: direction {name!r} has {what.shape[0]} values; this model's "
                                      f"residual stream has d_model = {d_model}")
                out[name] = ("vector", what.astype(np.float32))
        return out

    # -- tokens ---------------------------------------------------------------------------------------------
    def keep_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Which of the batch's real tokens (in mask order) are stored; None for all of them."""
        rule = self.options.positions
        if isinstance(rule, str):
            return None
        if isinstance(rule, tuple):
            pos = mask.cumsum(dim=1) - 1
            chosen = pos >= (mask.sum(dim=1, keepdim=True) - rule[1])
        else:
            chosen = rule(input_ids) if callable(rule) else rule
            what = "the positions callable returned" if callable(rule) else "the positions mask is"
            shape = tuple(getattr(chosen, "shape", ()))
            if shape != tuple(input_ids.shape) or str(getattr(chosen, "dtype", "")).removeprefix("torch.") != "bool":
                raise InputError(f"{what} {getattr(chosen, 'dtype', type(chosen).__name__)} of shape {shape}; it "
                                 f"must be a boolean (batch, seq) array like the input ids {tuple(input_ids.shape)}")
            chosen = torch.as_tensor(np.asarray(chosen.cpu() if hasattr(chosen, "cpu") else chosen))
        return chosen.cpu()[mask]

    # -- the store ------------------------------------------------------------------------------------------
    def attrs(self) -> dict:
        """What the store records of the selection (attribute ``selection``, JSON)."""
        rule = self.options.positions
        positions = (rule if isinstance(rule, str) else f"last:{rule[1]}" if isinstance(rule, tuple)
                     else f"callable {getattr(rule, '__name__', type(rule).__name__)}" if callable(rule) else "mask")
        project = {name: [kind, None if kind == "vector" else what] for name, (kind, what) in self.directions.items()}
        out = {"layers": list(self.layers) if self.layers else None, "heads": list(self.heads) if self.heads else None,
               "terms": list(self.kinds), "positions": positions, "rest": self.options.selects_terms and self.vectors,
               "project": project or None}
        return {"selection": json.dumps(out)}

    def static(self, static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights a selective store keeps: those of the stored layers and heads, with their coordinates."""
        from ..io.schema import dims_of

        if any(kind != "vector" for kind, _ in self.directions.values()) and "W_U" not in static:
            raise OptionError("option project: token directions need the model's unembedding, which this model lacks; "
                              "project onto vectors instead")
        vocab = static["W_U"].shape[0] if "W_U" in static else 0
        bad = [n for n, (kind, what) in self.directions.items() if kind == "token" and not 0 <= what < vocab]
        if bad:
            raise OptionError(f"option project: direction {bad[0]!r} is token id {self.directions[bad[0]][1]}, outside "
                              f"the model's vocabulary (0..{vocab - 1})")
        self._weights = {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                         for k, v in static.items()}
        out = {}
        for name, t in static.items():
            for axis, dim in enumerate(dims_of(name)):
                pick = self.layers if dim == "layer" else self.heads if dim == "head" else None
                if pick is not None:
                    t = t.index_select(axis, torch.tensor(pick, device=t.device))
            out[name] = t
        if self.layers is not None:
            out["layer"] = torch.tensor(self.layers, dtype=torch.int64)
        if self.heads is not None:
            out["head"] = torch.tensor(self.heads, dtype=torch.int64)
        return out

    # -- a batch --------------------------------------------------------------------------------------------
    def apply(self, out: dict[str, torch.Tensor], keep: torch.Tensor | None, logits=None,
              every_token: bool = False) -> dict[str, torch.Tensor]:
        """The batch as stored: the kept tokens, the kept terms, ``rest`` and the projections.

        ``every_token``: project every token, stored or not, and keep the result in ``all_projections``
        (a summarising capture's statistics cover every token the model saw)."""
        self.all_projections = None
        if self.directions and every_token:
            self.all_projections = self._projections(_arrays(out), out, logits)
        if keep is not None:
            keep_at = keep.to(out["resid_final"].device)
            out = {name: t[keep_at] for name, t in out.items()}
            if logits is not None:
                logits = logits[keep.to(logits.device)]
        arrays = _arrays(out)
        stored = {}
        if self.vectors:
            stored = {name: t for name, t in out.items() if name not in LAYERED
                      and (name not in self.bound.layout.embeds or "embed" in self.kinds)}
            for name, kind in LAYERED.items():
                if name in out and kind in self.kinds:
                    t = out[name]
                    if self.layers is not None:
                        t = t[:, list(self.layers)]
                    if name == "z" and self.heads is not None:
                        t = t[:, :, list(self.heads)]
                    stored[name] = t
            if self.options.selects_terms:
                stored["rest"] = torch.from_numpy(self._rest(arrays))
        if self.all_projections is not None:
            stored.update({name: t if keep is None else t[keep] for name, t in self.all_projections.items()})
        elif self.directions:
            stored.update(self._projections(arrays, out, logits))
        return stored

    def _events(self):
        """The stream's events as a store records them (read back from their JSON), made once."""
        from ..stream import from_json, to_json

        if "events" not in self._made:
            self._made["events"] = from_json(to_json(self.bound.events))
        return self._made["events"]

    def _norms(self, arrays) -> FrozenNorms:
        w = self._weights
        if "norm_weight" not in w:
            return FrozenNorms.none()
        return FrozenNorms(w["norm_weight"], w["norm_bias"], w["norm_center"].astype(bool), arrays["norm_scale"])

    def _rest(self, a: dict[str, np.ndarray]) -> np.ndarray:
        """Every component the selection leaves out, as it reaches the final residual (betas excluded)."""
        w, sizes = self._weights, SimpleNamespace(sizes={"head": self.bound.n_heads})
        keep = lambda label: covered(label, self.layers, self.heads, self.kinds)  # noqa: E731

        def source(e):
            from ..analysis.attribution import _pieces

            pieces = []
            for piece in _pieces(sizes, e, False):
                left = [i for i, label in enumerate(piece.labels) if not keep(label)]
                if not left:
                    continue
                label = piece.labels[0]
                if isinstance(e, Embed):
                    data = a[e.var]
                elif label[1] == "head":
                    heads = [piece.labels[i][3] for i in left]
                    data = np.einsum("thd,hdm->tm", a["z"][:, e.layer, heads], w["W_O"][e.layer][heads], optimize=True)
                elif label[1] == "attn_bias":
                    pieces.append(Piece([label], w["attn_bias"][e.layer][None], constant=True))
                    continue
                elif label[1] == "expert":   # the left-out experts' shares, summed over the routing slots
                    routed = np.isin(a["expert_index"][:, e.layer], left)   # the piece's labels are experts 0..E-1
                    data = np.einsum("ts,tsm->tm", routed.astype(np.float32), a["expert_out"][:, e.layer])
                elif label[1] == "shared_expert":
                    data = a["shared_expert_out"][:, e.layer]
                else:
                    data = a["mixer_out" if label[1] == "mixer" else "mlp_out"][:, e.layer]
                pieces.append(Piece([label], data[None]))
            return pieces

        acc = replay(self._events(), self._norms(a), source, _Rest())
        total = acc.total
        return np.broadcast_to(total, a["resid_final"].shape).astype(np.float32) if total is not None \
            else np.zeros_like(a["resid_final"])

    def projection_labels(self) -> list[tuple]:
        """The components of the stored projections: those the layers and heads keep, ``rest``, then the
        constants after the final norm (the same for every batch: made once)."""
        if "projection_labels" not in self._made:
            self._made["projection_labels"] = self._projection_labels()
        return self._made["projection_labels"]

    def _projection_labels(self) -> list[tuple]:
        full = self._full_labels()
        kept = [label for label in full if label[1] in ("final_norm_bias", "unembed_bias")
                or covered(label, self.layers, self.heads, TERM_KINDS)]
        tail = [label for label in kept if label[1] in ("final_norm_bias", "unembed_bias")]
        body = [label for label in kept if label not in tail]
        return body + ([REST] if len(kept) < len(full) else []) + tail

    def _full_labels(self) -> list[tuple]:
        """Every component of the full decomposition, in decompose's order (made once, after ``static``)."""
        if "full_labels" not in self._made:
            self._made["full_labels"] = self._labels_of_every_component()
        return self._made["full_labels"]

    def _labels_of_every_component(self) -> list[tuple]:
        from ..analysis.attribution import _pieces

        sizes = SimpleNamespace(sizes={"head": self.bound.n_heads})
        labels = replay(self._events(), FrozenNorms.none() if "norm_weight" not in self._weights else
                        FrozenNorms(self._weights["norm_weight"], self._weights["norm_bias"],
                                    self._weights["norm_center"].astype(bool)),
                        lambda e: _pieces(sizes, e, False), Labels(), norm_labels=self.bound.norm_labels()).labels
        w = self._weights
        return labels + [(n, n, -1, -1, -1) for n in ("final_norm_bias", "unembed_bias") if n in w]

    def _projections(self, a: dict[str, np.ndarray], out, logits) -> dict[str, torch.Tensor]:
        """(token, component, direction) contributions and (token, direction) totals of the final residual."""
        from ..analysis._store import FinalNorm
        from ..analysis.attribution import _dla_block

        w, T = self._weights, a["resid_final"].shape[0]
        b = {**a, **{k: w[k] for k in ("W_O", "attn_bias", "norm_weight", "norm_bias") if k in w}}
        b.pop("neuron_act", None)   # projected per MLP (the components are its labels), also with neurons=True
        center = w["norm_center"].astype(bool) if "norm_center" in w else np.zeros(0, bool)
        p = None
        if "final_norm_weight" in w:
            facts = self.bound_attrs()
            p = FinalNorm(center=facts["final_norm_kind"] == "layernorm", eps=float(facts["final_norm_eps"]),
                          gamma=w["final_norm_weight"], beta=w.get("final_norm_bias"))
        full = self._full_labels()
        columns, totals, names, top_ids, normed = [], [], [], None, None
        for name, (kind, what) in self.directions.items():
            if kind == "vector":
                b["U"] = what[None]
                cols = _dla_block(b, events=self._events(), center=center, p=_Identity(), b_U=None, t_idx=0, f_idx=None,
                                  has_foil=False, dt=np.float32)
                cols = np.concatenate([cols, np.zeros((T, len(full) - cols.shape[1]), np.float32)], axis=1)
                directions = [(cols, a["resid_final"] @ what)]
                names.append(name)
            else:
                ids = (np.full((T, 1), what) if kind == "token" else
                       torch.topk(logits.float(), what, dim=-1).indices.cpu().numpy())
                if kind == "top":
                    top_ids = ids
                directions = []
                for j in range(ids.shape[1]):
                    uniq, idx = np.unique(ids[:, j], return_inverse=True)
                    idx = idx.reshape(-1)
                    b["U"] = w["W_U"][uniq]
                    if len(uniq) > 1:   # one direction per token
                        b["t_idx"] = idx
                    b_U = w["unembed_bias"][uniq] if "unembed_bias" in w else None
                    cols = _dla_block(b, events=self._events(), center=center, p=p, b_U=b_U,
                                      t_idx=None if len(uniq) > 1 else 0, f_idx=None, has_foil=False, dt=np.float32)
                    b.pop("t_idx", None)
                    if normed is None:   # the final residual through the final norm: once for every direction
                        normed = p.apply(a["resid_final"])
                    total = np.einsum("tm,tm->t", normed, b["U"][idx])
                    directions.append((cols, total + (b_U[idx] if b_U is not None else 0)))
                    names.append(name if kind == "token" else f"top{j + 1}")
            for cols, total in directions:
                columns.append(self._regroup(cols, full))
                totals.append(total)
        result = {"projection": torch.from_numpy(np.stack(columns, axis=2).astype(np.float32)),
                  "projection_total": torch.from_numpy(np.stack(totals, axis=1).astype(np.float32))}
        if top_ids is not None:
            result["projection_top_id"] = torch.from_numpy(top_ids.astype(np.int64))
        self.direction_names = names
        return result

    def _regroup(self, cols: np.ndarray, full: list[tuple]) -> np.ndarray:
        """Full-decomposition columns -> the stored components, the left-out ones summed into ``rest``."""
        if "regroup" not in self._made:   # which full column each stored one is (the same for every batch)
            labels = self.projection_labels()
            at = {label: i for i, label in enumerate(labels)}
            kept = [(at[label], j) for j, label in enumerate(full) if label in at]
            left = [j for j, label in enumerate(full) if label not in at]
            self._made["regroup"] = (len(labels), np.array([i for i, _ in kept], np.int64),
                                     np.array([j for _, j in kept], np.int64), np.array(left, np.int64), at.get(REST))
        n, to, source, left, rest = self._made["regroup"]
        out = np.zeros((cols.shape[0], n), np.float32)
        out[:, to] = cols[:, source]
        for j in left:   # in the order of the full decomposition, as the offline sum adds them
            out[:, rest] += cols[:, j]
        return out

    def bound_attrs(self) -> dict:
        from ..layouts import Weights

        if not hasattr(self, "_final"):
            self._final = Weights(self.bound).attrs()
        return self._final


def _arrays(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The batch's terms as float32 arrays, with the experts' routing indices (their columns need them)."""
    arrays = {name: t.detach().float().cpu().numpy() for name, t in out.items() if t.is_floating_point()}
    if "expert_index" in out:
        arrays["expert_index"] = out["expert_index"].cpu().numpy()
    return arrays


class _Identity:
    """No final norm: a probe direction measures the final residual itself."""

    beta = None

    @staticmethod
    def scale(x):
        return np.ones(x.shape[0], np.float32)

    @staticmethod
    def fold(u):
        return u


class _Rest(Sum):
    """A running sum of the left-out terms only: betas stay components; a stream norm maps what came before."""

    def add(self, piece, through, norms) -> None:
        if piece.beta is None:
            super().add(piece, through, norms)

    def norm(self, k, norms) -> None:
        if self.total is not None:
            super().norm(k, norms)


__all__ = ["Selection", "REST", "covered", "selection_of"]
