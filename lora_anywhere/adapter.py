"""The trainable state of an adapter: low-rank factor pairs, grouped per layer.

These modules hold parameters only. How they change a layer's output lives in
`attach.py`; what a layer type offers lives in its rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .errors import LoraError
from .kernels import autocast_dtype, plus_low_rank
from .rule import Rule
from .sharding import is_sharded, may_be_sharded
from .weight_cache import Slot

#: How an adapter reaches a layer's output (its compute route): added on the layer's
#: activations, or through the weight the layer reads (W + ΔW). Both give the same numbers.
ROUTE_ACTIVATION, ROUTE_WEIGHT = "activation", "weight"


def output_norms(v: torch.Tensor, dim: int) -> torch.Tensor:
    """‖v‖ per output feature — over every axis but `dim` — shaped to broadcast against v."""
    return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != dim], keepdim=True)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_SAME_SIZE_INT[x.element_size()]) if x.is_floating_point() else x


@dataclass
class LostBits:
    """What merging rounded away from a base block, kept so that unmerging restores it
    to the bit: the elements that W + ΔW − ΔW does not give back (flat positions,
    int32 where they fit, and their values) or, where that is smaller, a copy of the
    whole block. Unmerging puts them back only where merging them again gives what
    the block holds now, so a change to the merged weight in between (another adapter
    merged on top) is kept."""

    index: torch.Tensor | None  # None: `base` is the whole block
    base: torch.Tensor

    @classmethod
    def between(cls, original: torch.Tensor, restored: torch.Tensor) -> LostBits | None:
        """`original` is a copy the record may keep."""
        lost = (_bits(original) != _bits(restored)).reshape(-1)
        count = int(lost.sum())
        if count == 0:
            return None
        index_dtype = torch.int32 if original.numel() < 2**31 else torch.int64
        if count * (index_dtype.itemsize + original.element_size()) >= original.numel() * original.element_size():
            return cls(None, original)
        index = lost.nonzero().flatten().to(index_dtype)
        return cls(index, original.reshape(-1)[index])

    def restore(self, block: torch.Tensor, unmerged: torch.Tensor, merge: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`unmerged` (the merged `block` with ΔW taken out) with the kept elements back
        wherever `merge` of them still gives what `block` holds."""
        if self.base.dtype != block.dtype or (self.index is None and self.base.shape != block.shape):
            return unmerged  # the model changed dtype while merged: restore what can be
        if self.index is None:
            candidate = self.base.to(block.device)
        else:
            candidate = unmerged.clone()
            candidate.view(-1)[self.index.to(device=block.device, dtype=torch.long)] = self.base.to(block.device)
        return torch.where(_bits(merge(candidate)) == _bits(block), candidate, unmerged)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.base) if t is not None)


class LowRank(nn.Module):
    """ΔM = scale · B @ A for one rows × cols matrix. B starts at zero, so the
    adapted model computes exactly what the base model does until it trains.

    With `init_from` (SVD initialisation, PiSSA) A and B start as the matrix's top
    singular directions and ΔM = scale · (B A − B₀ A₀), where B₀ A₀ is their frozen
    starting product: the same function and gradients as PiSSA's residual base
    W − s·B₀A₀ plus s·BA, while the base tensor itself is never changed — so base
    outputs, removal and loading onto a plain base stay exact.
    """

    def __init__(
        self, rows: int, cols: int, rank: int, scale: float, *, dtype: torch.dtype, device: torch.device, svd: bool = False
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, cols, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=device))
        self.scale = float(scale)
        if svd:
            self.register_buffer("A0", torch.zeros(rank, cols, dtype=dtype, device=device))
            self.register_buffer("B0", torch.zeros(rows, rank, dtype=dtype, device=device))
        else:
            self.A0 = self.B0 = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A drawn as nn.Linear draws its weight (and PEFT draws A), B zero: ΔM = 0.
        Named like every torch layer's, so the usual init loops reach it."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B.zero_()
        if self.A0 is not None:
            self.A0.zero_()
            self.B0.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> LowRank:
        # `to_empty()` gives a model built on the meta device uninitialised memory:
        # an adapter must still start at ΔM = 0.
        was_meta = self.B.device.type == "meta"
        super()._apply(fn, recurse)
        if was_meta and self.B.device.type != "meta":
            self.reset_parameters()
        return self

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @torch.no_grad()
    def init_from(self, matrix: torch.Tensor) -> None:
        """A, B (and A₀, B₀) from the top-r singular triplets of `matrix` (rows × cols)."""
        m = matrix.detach().float()
        r = self.rank
        if min(m.shape) <= 1024:
            u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        else:  # randomized SVD: exactness does not depend on its accuracy
            u, sv, v = torch.svd_lowrank(m, q=min(r + 8, min(m.shape)), niter=4)
            vh = v.T
        root = (sv[:r] / self.scale).sqrt()
        self.B.copy_(u[:, :r] * root)
        self.A.copy_(root[:, None] * vh[:r])
        self.B0.copy_(self.B)
        self.A0.copy_(self.A)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) such that ΔM = scale · B @ A: with SVD initialisation, the trained and
        the frozen starting factors stacked, so activation routes stay one projection."""
        if self.A0 is None:
            p = self._parameters  # every call reads them: no `nn.Module.__getattr__` on the way
            return (p["A"], p["B"]) if "A" in p and "B" in p else (self.A, self.B)
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)

    def delta(self) -> torch.Tensor:
        """The rows × cols update, scale folded into the small factor."""
        a, b = self.pair()
        return (b * self.scale) @ a

    def extra_repr(self) -> str:
        init = ", svd init" if self.A0 is not None else ""
        return f"rows={self.B.shape[0]}, cols={self.A.shape[1]}, rank={self.rank}, scale={self.scale:g}{init}"


@dataclass
class Term:
    """One adapter's contribution to one module on the activation route:
    ``y += scale · B(A(dropout(x)))``, with A (r × cols) and B (rows × r).

    ``dropout(x)`` is the input the adapter sees: with dropout while training, and
    zero for the samples that use another adapter (`serving.per_sample`). A rule
    whose input is not a tensor of features (an embedding's indices) applies
    ``select_samples`` to the term's output instead."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    adapter: LayerAdapter
    selected: bool = False  # whether the rule's forward applied the sample selection
    # Several adapters of a per-sample batch stacked into one term (`stacked`): the
    # adapter's scale where a sample's adapter owns a rank column of A's output, else 0
    # (samples × ranks); B is then unscaled.
    rank_mask: torch.Tensor | None = None

    @property
    def dropout_active(self) -> bool:
        """Whether `dropout(x)` changes x: the rule must then call it (no fused route)."""
        return self.adapter.dropout_active

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.dropout(self.select_samples(x))

    def select_samples(self, t: torch.Tensor) -> torch.Tensor:
        self.selected = True
        return self.adapter.select_samples(t)

    def mask_ranks(self, z: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """A's output `z` of a stacked term with each sample's columns of other adapters
        zeroed; `channel_dim` is where z keeps its rank columns."""
        self.selected = True
        mask, d = self.rank_mask, self.adapter.sample_dim
        if mask is None:
            return z
        if z.dim() <= d or z.shape[d] != mask.shape[0]:
            self.adapter.select_samples(z)  # raises the error that says what is wrong
        shape = [1] * z.dim()
        shape[d], shape[channel_dim] = mask.shape
        return z * mask.to(z.dtype).view(shape)

    @classmethod
    def stacked(cls, terms: list[Term]) -> Term:
        """One term for the adapters of a per-sample batch: their A's stacked, their
        B's side by side, and a mask that keeps, for each sample, its adapter's rank
        columns scaled by that adapter's scale — one low-rank projection instead of
        one per adapter."""
        a = torch.cat([t.a for t in terms])
        b = torch.cat([t.b for t in terms], dim=1)
        masks = [t.adapter.sample_mask[:, None].expand(-1, t.a.shape[0]) for t in terms]
        scales = {t.scale for t in terms}
        if len(scales) == 1:  # the usual case: one multiply of the small mask, not of each B
            scale = scales.pop()
            mask = torch.cat(masks, dim=1)
            rank_mask = mask if scale == 1.0 else mask * scale
        else:
            rank_mask = torch.cat([m * t.scale for m, t in zip(masks, terms)], dim=1)
        return cls(a, b, 1.0, terms[0].adapter, rank_mask=rank_mask)


def _row_pieces(
    blocks: Iterable[ResolvedTarget],
    rows: int,
    block: Callable[[ResolvedTarget], torch.Tensor | None],
    gap: Callable[[int, int], torch.Tensor],
) -> list[torch.Tensor] | None:
    """A tensor of `rows` rows in pieces, top to bottom: ``block(t)`` for each row block,
    ``gap(start, stop)`` for the rows between and after them. None where blocks overlap
    or a block gives None."""
    pieces, row = [], 0
    for t in sorted(blocks, key=lambda t: t.rows[0]):
        start, stop = t.rows
        piece = block(t) if start >= row else None
        if piece is None:
            return None
        pieces += [gap(row, start), piece] if start > row else [piece]
        row = stop
    if row < rows:
        pieces.append(gap(row, rows))
    return pieces


def _tile(blocks: list[ResolvedTarget], rows: int) -> bool:
    """Whether the row blocks, in their order, cover rows 0 … `rows` without gaps."""
    row = 0
    for t in blocks:
        if t.rows is None or t.rows[0] != row:
            return False
        row = t.rows[1]
    return row == rows


@dataclass(frozen=True)
class ResolvedTarget:
    """A rule's target bound to a concrete tensor of a concrete layer."""

    name: str
    owner: str  # dotted path from the layer to the module that owns the tensor
    tensor: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the whole tensor's shape
    output_dim: int = 0  # the dimension of the tensor that indexes output features

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = self.shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        return n, math.prod(self.shape[1:])

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of the part of the tensor this target adapts."""
        return (self.matrix_shape[0], *self.shape[1:])

    @property
    def full_rank(self) -> int:
        return min(self.matrix_shape)

    def owner_in(self, layer: nn.Module) -> nn.Module:
        """The module below `layer` that holds this target's tensor (`layer` itself for "")."""
        return layer.get_submodule(self.owner)

    def parameter_in(self, layer: nn.Module) -> nn.Parameter:
        """The raw base tensor (never W + ΔW, whatever the owner's class reads)."""
        return self.owner_in(layer)._parameters[self.tensor]

    def block_in(self, layer: nn.Module) -> torch.Tensor:
        """The part of the raw base tensor this target adapts: all of it, or its row block."""
        raw = self.parameter_in(layer)
        return raw if self.rows is None else raw[self.rows[0] : self.rows[1]]


class LayerAdapter(nn.Module):
    """One named adapter on one layer: a `LowRank` per target.

    ``route`` says how it reaches the output: on the activations (the rule's forward)
    or on the weight (whoever reads the tensor sees W + ΔW).
    """

    def __init__(
        self,
        rule: Rule,
        targets: Iterable[ResolvedTarget],
        ranks: Mapping[str, int],
        scale: float,
        *,
        activation_owners: Mapping[str, Rule] | None = None,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device,
        svd: bool = False,
        dora: bool = False,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.targets = {t.name: t for t in targets}
        self._index_targets()
        # The modules (paths below the layer) whose forward adds this adapter on the
        # activations, each with the rule that computes it; every other target
        # reaches the output through W + ΔW.
        self.activation_owners: dict[str, Rule] = dict(activation_owners or {})
        self.dropout_p = float(dropout)
        self.merged = False
        self.active = True
        self.factors = nn.ModuleDict(
            {t.name: LowRank(*t.matrix_shape, ranks[t.name], scale, dtype=dtype, device=device, svd=svd) for t in self.targets.values()}
        )
        # DoRA: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with one magnitude per output feature (the
        # norm runs over every other axis); m starts as ‖W‖ (`init_magnitudes`).
        self.magnitudes = nn.ParameterDict(
            {t.name: nn.Parameter(torch.ones(t.block_shape[t.output_dim], dtype=dtype, device=device)) for t in self.targets.values()}
            if dora
            else {}
        )
        self._merged_norms: dict[str, torch.Tensor] = {}
        self._lost: dict[str, LostBits] = {}
        # While serving several adapters in one batch (`serving.per_sample`): 1 for the
        # samples (along `sample_dim` of each input) that use this adapter, else 0.
        self.sample_mask: torch.Tensor | None = None
        self.sample_dim = 0

    def _index_targets(self) -> None:
        """The targets on each tensor and below each owner, in row order: every forward
        looks them up, so they are grouped once (the targets never change)."""
        self._on_tensor: dict[tuple[str, str], list[ResolvedTarget]] = {}
        self._on_owner: dict[str, list[ResolvedTarget]] = {}
        for t in sorted(self.targets.values(), key=lambda t: t.rows or (0, 0)):
            self._on_tensor.setdefault((t.owner, t.tensor), []).append(t)
            self._on_owner.setdefault(t.owner, []).append(t)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_on_tensor" not in state:  # pickled by a version without the index
            self._index_targets()

    @property
    def dora(self) -> bool:
        return len(self._modules["magnitudes"]) > 0

    @torch.no_grad()
    def init_magnitudes(self, blocks: Mapping[str, torch.Tensor]) -> None:
        for name, block in blocks.items():
            self.magnitudes[name].copy_(output_norms(block, self.targets[name].output_dim).flatten())

    def _magnitude(self, t: ResolvedTarget, like: torch.Tensor) -> torch.Tensor:
        """m shaped to broadcast against the block `like`."""
        shape = [-1 if d == t.output_dim else 1 for d in range(like.dim())]
        return self.magnitudes[t.name].to(like.dtype).view(shape)

    @property
    def route(self) -> str:
        """ "activation", "weight", or "mixed" when some targets take each route."""
        owners = {t.owner for t in self.targets.values()}
        if not self.activation_owners:
            return ROUTE_WEIGHT
        return ROUTE_ACTIVATION if owners <= self.activation_owners.keys() else "mixed"

    def activation_rule(self, owner: str) -> Rule:
        return self.activation_owners[owner]

    def activation_term(self, owner: str, rows: int) -> Term:
        """This adapter's term for the module at `owner`, whose weight has `rows` rows:
        row blocks (q and v of a fused qkv) become one A and a B that is zero outside
        its blocks, so the whole update stays one low-rank projection."""
        blocks = self._on_owner[owner]
        if len(blocks) == 1 and blocks[0].rows is None:
            f = self._modules["factors"]._modules[blocks[0].name]
            return Term(*f.pair(), f.scale, self)
        factors = [self.factors[t.name] for t in blocks]
        pairs = [f.pair() for f in factors]
        a = torch.cat([a for a, _ in pairs])
        scales = {f.scale for f in factors}
        if len(scales) == 1 and _tile(blocks, rows):
            # q, k and v in order over all rows (the usual packed projection): B is
            # their block diagonal, and the one scale stays a scalar — one op, not a
            # scaled, padded copy per block.
            return Term(a, torch.block_diag(*(b for _, b in pairs)), scales.pop(), self)
        b_parts = [F.pad(b * f.scale, (0, 0, t.rows[0], rows - t.rows[1])) for t, f, (_, b) in zip(blocks, factors, pairs)]
        return Term(a, torch.cat(b_parts, dim=1), 1.0, self)

    @property
    def live(self) -> bool:
        """Whether this adapter still has to be added at run time."""
        return self.active and not self.merged

    @property
    def dropout_active(self) -> bool:
        return (self.dropout_p > 0.0 and self.training) or self.sample_mask is not None

    def select_samples(self, t: torch.Tensor) -> torch.Tensor:
        """`t` with the samples that use another adapter zeroed (itself outside `per_sample`)."""
        mask = self.sample_mask
        if mask is None:
            return t
        d = self.sample_dim
        if t.dim() <= d or t.shape[d] != mask.shape[0]:
            raise LoraError(
                f"per-sample adapters: a layer's input has shape {tuple(t.shape)}, but {mask.shape[0]} samples were named along "
                f"dimension {d}; give one adapter name per sample of that dimension (dim= for sequence-first inputs)"
            )
        shape = [1] * t.dim()
        shape[d] = -1
        return t * mask.to(t.dtype).view(shape)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        # With p = 0 the input is passed through: no copy of the activation.
        if self.dropout_p == 0.0 or not self.training:
            return x
        return F.dropout(x, self.dropout_p, training=True)

    def block_delta(self, t: ResolvedTarget, block: torch.Tensor) -> torch.Tensor:
        """ΔW for one target, given the block of the tensor it updates."""
        delta = self.factors[t.name].delta().view(block.shape).to(block.dtype)
        if not self.dora:
            return delta
        return self._dora_weight(t, block)[0] - block

    def _dora_weight(self, t: ResolvedTarget, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA's W' = m ⊙ V/‖V‖ with V = W + ΔW, and ‖V‖: the one computation that both
        the unmerged layer and merging run, so merged and unmerged agree to the bit."""
        v = block + self.factors[t.name].delta().view(block.shape).to(block.dtype)
        norm = output_norms(v, t.output_dim)
        return v * (self._magnitude(t, v) / norm), norm

    def add_to(self, owner: str, tensor: str, w: torch.Tensor) -> torch.Tensor:
        """w + ΔW for one tensor (`w` itself if this adapter does not touch it). The
        common case — plain LoRA on a whole tensor — is one addmm: the same op that
        `merge_block` runs in place, so merged and unmerged agree to the bit."""
        blocks = self._on_tensor.get((owner, tensor))
        if blocks is None or self._sharded(blocks):
            return w
        whole = len(blocks) == 1 and blocks[0].rows is None
        if whole or all(t.rows is not None for t in blocks):
            fast_sum = self._whole_plus_low_rank if whole else self._rows_plus_low_rank
            if autocast_dtype(w.device.type) is None:
                fast = fast_sum(blocks, w)
            else:  # W + ΔW keeps W's dtype: the layer casts it as it would W
                with torch.autocast(w.device.type, enabled=False):
                    fast = fast_sum(blocks, w)
            if fast is not None:
                return fast
            if whole and self.dora:
                return self._dora_weight(blocks[0], w)[0]
        return w + self._blocks_delta(list(blocks), w)

    def _whole_plus_low_rank(self, blocks: list[ResolvedTarget], w: torch.Tensor) -> torch.Tensor | None:
        """W + ΔW for the one target on the whole of W (`_rows_plus_low_rank`'s twin)."""
        return self._plus_low_rank(blocks[0], w)

    def _plus_low_rank(self, t: ResolvedTarget, block: torch.Tensor) -> torch.Tensor | None:
        """block + ΔW as one addmm (`plus_low_rank`), or None where it does not apply."""
        fast = self._addmm_factors(t, block)
        return None if fast is None else plus_low_rank(block, fast[1], fast[0], fast[2])

    def _rows_plus_low_rank(self, blocks: list[ResolvedTarget], w: torch.Tensor) -> torch.Tensor | None:
        """W + ΔW for row blocks (q, k, v of a packed projection): one addmm per block and
        W's own rows between them, joined — the ops `merge_block` runs on each block in
        place, and fewer per call than forming the blocks' ΔW, padding and adding it."""
        pieces = _row_pieces(blocks, w.shape[0], lambda t: self._plus_low_rank(t, w[t.rows[0] : t.rows[1]]), lambda i, j: w[i:j])
        return None if pieces is None else torch.cat(pieces)

    def input_slots(self, owner: str, tensor: str) -> list[Slot]:
        """Where each tensor `add_to` reads to update this tensor lives (none if it
        leaves it alone): the `_parameters` or `_buffers` dict of its module, and its key.
        A kept W + ΔW (`weight_cache`) rereads these places at each call, so a tensor
        put in their place is seen without asking the adapter again."""
        out: list[Slot] = []
        targets = self._on_tensor.get((owner, tensor))
        if targets is None:
            return out
        factors, dora = self._modules["factors"]._modules, self.dora
        for t in targets:
            f = factors[t.name]
            out += [(f._parameters, k) for k in f._parameters]
            out += [(f._buffers, k) for k in f._buffers]
            if dora:
                out.append((self._modules["magnitudes"]._parameters, t.name))
        return out

    def _sharded(self, blocks: list[ResolvedTarget]) -> bool:
        """Whether FSDP2 holds some factor as a shard: while it swaps a layer's tensors
        (whole ↔ shard) one by one, W can already be whole while A and B are not."""
        if not may_be_sharded():
            return False
        factors = self._modules["factors"]._modules
        return is_sharded(*(p for t in blocks for p in factors[t.name]._parameters.values()))

    def _addmm_factors(self, t: ResolvedTarget, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.dora or not block.is_contiguous():
            return None
        f = self._modules["factors"]._modules[t.name]
        a, b = f.pair()
        return (a, b, f.scale) if a.dtype == block.dtype else None

    def _blocks_delta(self, blocks: list[ResolvedTarget], like: torch.Tensor) -> torch.Tensor:
        """ΔW in the full shape of `like`, from this adapter's targets on that tensor."""
        if len(blocks) == 1 and blocks[0].rows is None:
            return self.block_delta(blocks[0], like)
        # Row blocks (q, k, v of a packed projection): zeros where nothing is adapted.
        tail = like.shape[1:]
        pieces = _row_pieces(
            blocks, like.shape[0], lambda t: self.block_delta(t, like[t.rows[0] : t.rows[1]]), lambda i, j: like.new_zeros((j - i, *tail))
        )
        if pieces is None:
            raise LoraError(f"targets {', '.join(t.name for t in blocks)} overlap in the rows of one tensor")
        return torch.cat(pieces, dim=0)

    def set_trainable(self, on: bool, *, freeze_a: bool = False) -> None:
        for f in self.factors.values():
            f.A.requires_grad_(on and not freeze_a)
            f.B.requires_grad_(on)
        for m in self.magnitudes.values():
            m.requires_grad_(on)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines this adapter, keyed ``target/name``: A and B, the
        frozen SVD start A0 and B0, and DoRA's magnitude m."""
        out = {}
        for name, f in self.factors.items():
            for key in ("A", "B", "A0", "B0"):
                value = getattr(f, key)
                if value is not None:
                    out[f"{name}/{key}"] = value
            if name in self.magnitudes:
                out[f"{name}/m"] = self.magnitudes[name]
        return out

    @torch.no_grad()
    def merge_block(self, t: ResolvedTarget, block: torch.Tensor, sign: int, *, exact: bool = True) -> None:
        """Add (sign +1) or take out (-1) this adapter's update, in place.

        W + ΔW is rounded, so W + ΔW − ΔW can miss W by an ulp where the sum changed
        binade (in any dtype; in bf16 on many elements). With `exact`, merging keeps
        those few elements of W (`LostBits`) and taking the update out puts them back:
        the base returns to the bit. DoRA's update depends on W, so merging also
        remembers ‖W + ΔW‖ to invert it."""
        if sign > 0:
            original = block.clone() if exact else None
            self._lost.pop(t.name, None)
            self._add(t, block)
            if original is not None:
                lost = LostBits.between(original, self._without(t, block))
                if lost is not None:
                    self._lost[t.name] = lost
            return
        unmerged = self._without(t, block)
        lost = self._lost.pop(t.name, None)
        if lost is not None:
            unmerged = lost.restore(block, unmerged, lambda w: self._merged(t, w))
        block.copy_(unmerged)
        self._merged_norms.pop(t.name, None)

    def _add(self, t: ResolvedTarget, block: torch.Tensor) -> None:
        fast = self._addmm_factors(t, block)
        if fast is not None:
            a, b, scale = fast
            block.view(b.shape[0], -1).addmm_(b, a, alpha=scale)
            return
        if not self.dora:
            block.add_(self.factors[t.name].delta().view(block.shape).to(block.dtype))
            return
        weight, self._merged_norms[t.name] = self._dora_weight(t, block)
        block.copy_(weight)

    def _merged(self, t: ResolvedTarget, block: torch.Tensor) -> torch.Tensor:
        """What `_add` makes of `block`, as a new tensor (the same ops, to the bit)."""
        fast = self._plus_low_rank(t, block)
        if fast is not None:
            return fast
        if not self.dora:
            return block + self.factors[t.name].delta().view(block.shape).to(block.dtype)
        return self._dora_weight(t, block)[0]

    def _without(self, t: ResolvedTarget, block: torch.Tensor) -> torch.Tensor:
        """The merged `block` with this adapter's update taken out (a new tensor)."""
        fast = self._addmm_factors(t, block)
        if fast is not None:
            a, b, scale = fast
            return plus_low_rank(block, b, a, -scale)
        delta = self.factors[t.name].delta().view(block.shape).to(block.dtype)
        if not self.dora:
            return block - delta
        return block * self._merged_norms[t.name] / self._magnitude(t, block) - delta

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("active" if self.active else "disabled")
        return f"rule={self.rule.name}, route={self.route}, dropout={self.dropout_p:g}, {state}"
