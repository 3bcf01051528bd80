"""The persistent device batch: each running sequence's decode inputs stay resident on the device.

A decode step reads, per row, the last token, its position, the context length, the block-table
row, the sampler's parameters and the budget state, and advances the token, position, length and
state in place (decode_step.py). Those rows live here, in device tensors of a fixed capacity that
persist across steps and chunks, so between two chunks the device already holds what the next chunk
reads. The host sends only what changed (vLLM v1's persistent InputBatch is the model):

- rows that joined (a sequence after its prefill, or one whose row went stale): the whole row;
- rows that left (finished, preempted, aborted): the rows after them close up in order (a gather
  of the kept rows, sent only when a row left before the last), so the live rows are always 0..n-1
  in the scheduler's order (the batch's rows are then in the order today's fresh tensors had them,
  which keeps row-position-dependent GEMM numerics unchanged) and rows n.. are padding (DONE, one
  token of context, nothing written), which a CUDA graph captured for a bucket of b >= n expects;
- block-table entries added since the last chunk: (row, column, block) triples.

Host work per chunk grows with these changes, not with the batch size (plus one pass over the
batch to find them). `RowPlanner` is the host's bookkeeping (rank 0 only): which sequence owns
which row, and the `BatchUpdate` that brings the rows to the next decode batch; `DeviceBatch` holds
the tensors on every tensor-parallel rank and applies the same updates. A row is valid while its
sequence keeps the `epoch` it had when the row was written: the scheduler bumps it whenever it frees
the sequence's blocks (preemption, recompute after a weight update, abort, finish).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from elastic_decode.kernels import (
    DONE,
    MARKER_PAD,
    MAX_MARKER_TOKENS,
    NO_LIMIT,
    RECENT_PAD,
    STOP_PAD,
    BudgetState,
    SamplerParams,
)

from ..core.sequence import Sequence
from .decode_step import DecodeInputs

STOP_WIDTH = 8  # EOS ids + stop_token_ids per request; the batch widens (reallocates) for a longer list

HostFields = dict[str, tuple[torch.dtype, list, tuple[int, ...]]]  # name -> (dtype, flat values, shape)


def upload(host: HostFields, device: torch.device) -> dict[str, torch.Tensor]:
    """Named flat host values -> device tensors of the given shapes, in one copy per dtype rather
    than one per field. Each field is a view of its dtype's buffer starting 16-byte aligned, as a
    fresh allocation would be (Triton specialises kernels on pointer alignment)."""
    by_dtype: dict[torch.dtype, list] = {}
    for name, (dtype, values, shape) in host.items():
        by_dtype.setdefault(dtype, []).append((name, values, shape))
    out = {}
    for dtype, items in by_dtype.items():
        align = 16 // dtype.itemsize
        flat, spans = [], []
        for name, values, shape in items:
            spans.append((name, len(flat), shape))
            flat += values
            flat += [0] * (-len(flat) % align)
        buf = torch.tensor(flat, dtype=dtype).to(device, non_blocking=True)
        for name, start, shape in spans:
            out[name] = buf[start : start + math.prod(shape)].view(shape)
    return out


def _rows(values: list[list[int]], width: int, fill: int) -> list[list[int]]:
    """Right-align ragged int rows into a rectangle."""
    return [[fill] * (width - len(v)) + list(v) for v in values]


def sampler_fields(seqs, width: int | None = None, stop_width: int | None = None) -> HostFields:
    """The sampler's rows of `seqs` on the host; marker and stop columns as wide as the batch needs
    unless given."""
    n = len(seqs)
    width = width or max(len(s.marker) for s in seqs)
    stop_width = stop_width or max(1, max(len(s.stop_ids) for s in seqs))
    i32, f32 = torch.int32, torch.float32
    p = [s.params for s in seqs]

    def flat(rows: list[list[int]]) -> list[int]:
        return [v for row in rows for v in row]

    return {
        "temperature": (f32, [x.temperature for x in p], (n,)),
        "top_k": (i32, [max(x.top_k, 0) for x in p], (n,)),
        "top_p": (f32, [x.top_p for x in p], (n,)),
        "min_p": (f32, [x.min_p for x in p], (n,)),
        "seed": (torch.long, [s.seed for s in seqs], (n,)),
        "think_budget": (i32, [s.think_limit if s.think_limit is not None else x.think_budget
                               if x.think_budget is not None else NO_LIMIT for s, x in zip(seqs, p)], (n,)),
        "solution_budget": (i32, [x.solution_budget if x.solution_budget is not None else NO_LIMIT for x in p], (n,)),
        "max_new_tokens": (i32, [s.max_new_tokens for s in seqs], (n,)),
        "min_think": (i32, [x.min_think for x in p], (n,)),
        "min_tokens": (i32, [x.min_tokens for x in p], (n,)),
        "marker": (i32, flat(_rows([s.marker for s in seqs], width, MARKER_PAD)), (n, width)),
        "marker_len": (i32, [len(s.marker) for s in seqs], (n,)),
        "stop_ids": (i32, flat([list(s.stop_ids) + [STOP_PAD] * (stop_width - len(s.stop_ids)) for s in seqs]),
                     (n, stop_width)),
        "phase": (i32, [s.phase for s in seqs], (n,)),
        "think_count": (i32, [s.think_count for s in seqs], (n,)),
        "solution_count": (i32, [s.solution_count for s in seqs], (n,)),
        "generated": (i32, [s.num_generated for s in seqs], (n,)),
        "force_pos": (i32, [s.force_pos for s in seqs], (n,)),
        "recent": (i32, flat(_rows([s.recent for s in seqs], width, RECENT_PAD)), (n, width)),
        "forced_end": (i32, [s.forced_end for s in seqs], (n,)),
        "forced": (i32, [0] * n, (n,)),
        "finish": (i32, [s.finish for s in seqs], (n,)),
        "confidence": (f32, [0.0] * n, (n,)),
    }


def decode_fields(seqs, stop_width: int | None = None) -> HostFields:
    """A decode row of each sequence, block table aside: last token, position, context length, sampler
    (marker and stop columns as wide as these sequences need, unless given)."""
    n = len(seqs)
    return {
        "input_ids": (torch.long, [s.token_ids[-1] for s in seqs], (n,)),
        "positions": (torch.long, [len(s) - 1 for s in seqs], (n,)),
        "context_lens": (torch.int32, [len(s) for s in seqs], (n,)),
        **sampler_fields(seqs, None, stop_width),
    }


@dataclass(frozen=True)
class BatchUpdate:
    """What turns the device rows of the last decode batch into the next one's (host values: rank 0
    sends it to the tensor-parallel workers, which apply it to their own DeviceBatch)."""

    n: int  # live rows after the update: 0..n-1
    capacity: int  # rows the tensors must hold at least
    block_width: int  # block-table columns they must hold at least
    stop_width: int  # stop-id columns they must hold
    keep: list[int] | None = None  # rows that stay, in order: they move to rows 0.. (None: they are there)
    joins: tuple[list[int], HostFields] | None = None  # (rows, their decode_fields, as narrow as they need)
    blocks: tuple[list[int], list[int], list[int]] = ([], [], [])  # block-table (row, column, block id)
    pad: tuple[int, int] = (0, 0)  # rows [start, end) become padding
    perm: list[int] | None = None  # batch position -> row, when it changed (None: unchanged)
    reset: bool = False  # the planner starts afresh: every row is padding before this update


@dataclass
class _Row:
    seq: Sequence
    epoch: int  # seq.epoch when the row was written
    table: list[int]  # seq.block_table (grown in place by the scheduler while the epoch holds)
    blocks: int  # block-table entries the device row holds


@dataclass
class RowPlanner:
    """Rank 0's bookkeeping of the DeviceBatch: who owns each row, and the updates."""

    rows: list[_Row | None] = field(default_factory=list)  # row -> owner (None: released); len = live region
    row_of: dict[int, int] = field(default_factory=dict)  # id(seq) -> row
    seqs: tuple = ()  # the last batch
    perm: list[int] = field(default_factory=list)  # the last batch's rows in batch order
    capacity: int = 0
    block_width: int = 0
    stop_width: int = STOP_WIDTH
    top: int = 0  # the last batch's most top logprobs asked for
    marker_width: int = 1  # and its longest marker
    fresh: bool = True  # no update sent yet: the device rows may hold anything

    @property
    def live(self) -> int:
        """Rows held by a sequence (finished ones are released as soon as their chunk is read)."""
        return len(self.row_of)

    def release(self, seqs) -> None:
        """The rows of `seqs` (finished) are released now; the next update closes them up or pads them."""
        for seq in seqs:
            row = self.row_of.pop(id(seq), None)
            if row is not None:
                self.rows[row] = None

    def update(self, seqs: tuple[Sequence, ...]) -> BatchUpdate:
        n, old = len(seqs), len(self.rows)
        same = seqs == self.seqs and all(row is not None and row.seq.epoch == row.epoch for row in self.rows)
        keep, joining, join_rows = None, [], []
        if not same:  # someone joined, left or went stale: find who
            keep, joining, join_rows = self._membership(seqs)
        self.seqs = seqs
        block_rows, block_cols, block_ids = [], [], []
        for r, row in enumerate(self.rows):  # block-table entries added since the row was last synced
            table = row.table
            if len(table) > row.blocks:
                block_rows += [r] * (len(table) - row.blocks)
                block_cols += range(row.blocks, len(table))
                block_ids += table[row.blocks :]
                row.blocks = len(table)
        if block_cols:
            self.block_width = max(self.block_width, max(block_cols) + 1)
        self.capacity = max(self.capacity, n)
        perm_changed = False
        if not same:
            perm = [self.row_of[id(s)] for s in seqs]
            perm_changed, self.perm = perm != self.perm, perm
            self.top = max((s.params.logprobs for s in seqs), default=0)
            self.marker_width = max((len(s.marker) for s in seqs), default=1)
        update = BatchUpdate(
            n=n, capacity=self.capacity, block_width=self.block_width, stop_width=self.stop_width,
            keep=keep,
            joins=(join_rows, decode_fields(joining)) if joining else None,
            blocks=(block_rows, block_cols, block_ids), pad=(n, max(n, old)),
            perm=self.perm if perm_changed or self.fresh else None, reset=self.fresh,
        )
        self.fresh = False
        return update

    def _membership(self, seqs: tuple[Sequence, ...]) -> tuple[list[int] | None, list[Sequence], list[int]]:
        """Drop the rows that left or went stale, close up the rest in order, give the joiners rows:
        (kept rows when they moved, else None; joining sequences; their rows)."""
        n = len(seqs)
        wanted = {id(s) for s in seqs}
        keep = []  # rows whose sequence stays in the batch with a valid row, in row order
        for r, row in enumerate(self.rows):
            if row is None:
                continue
            if id(row.seq) in wanted and row.seq.epoch == row.epoch:
                keep.append(r)
            else:  # left the batch, or went stale
                del self.row_of[id(row.seq)]
        compact = keep != list(range(len(keep)))
        if compact:  # the kept rows close up in order (a stable compaction keeps the batch's row order)
            self.rows = [self.rows[r] for r in keep]
            self.row_of.update((id(row.seq), r) for r, row in enumerate(self.rows))
        else:
            del self.rows[len(keep):]
        joining = [s for s in seqs if id(s) not in self.row_of]
        join_rows = list(range(len(keep), n))
        for r, seq in zip(join_rows, joining):
            self.rows.append(_Row(seq, seq.epoch, seq.block_table, 0))
            self.row_of[id(seq)] = r
        if joining:
            self.stop_width = max(self.stop_width, max(len(s.stop_ids) for s in joining))
        return (keep if compact else None), joining, join_rows


_COLUMNS = {"marker": "marker", "recent": "marker", "stop_ids": "stop", "block_tables": "blocks"}
_ROW_FIELDS = ("input_ids", "positions", "context_lens", "block_tables",
               *(f.name for f in fields(SamplerParams)), *(f.name for f in fields(BudgetState)))


def _decode_inputs(by_name: dict[str, torch.Tensor]) -> DecodeInputs:
    """DecodeInputs from its row fields by name (_ROW_FIELDS)."""
    return DecodeInputs(
        input_ids=by_name["input_ids"], positions=by_name["positions"], context_lens=by_name["context_lens"],
        block_tables=by_name["block_tables"],
        params=SamplerParams.take(by_name), state=BudgetState.take(by_name))


class DeviceBatch:
    """The resident rows (a DecodeInputs of `capacity` rows) on one rank; rows n.. are padding."""

    def __init__(self, device: torch.device):
        self.device = device
        self.capacity = self.block_width = 0
        self.stop_width = STOP_WIDTH
        self.full: DecodeInputs | None = None
        self.n = 0
        self.perm: torch.Tensor | None = None  # int64 [n]: batch position -> row; None = identity
        self.generation = 0  # bumped when the tensors are reallocated (CUDA graphs hold their addresses)

    def tensors(self) -> dict[str, torch.Tensor]:
        full = self.full
        return {"input_ids": full.input_ids, "positions": full.positions, "context_lens": full.context_lens,
                "block_tables": full.block_tables, **vars(full.params), **vars(full.state)}

    def view(self, rows: int) -> DecodeInputs:
        """The first `rows` rows (views: a step on them advances the resident rows)."""
        return _decode_inputs({name: t[:rows] for name, t in self.tensors().items()})

    def ensure(self, capacity: int, block_width: int, stop_width: int) -> None:
        """Grow the tensors to at least this size (contents kept, new rows padding); rows and block
        columns at least double, so a growing batch reallocates a logarithmic number of times."""
        if self.full is not None and (capacity <= self.capacity and block_width <= self.block_width
                                      and stop_width <= self.stop_width):
            return
        grow = (lambda want, have: have if want <= have else max(want, 2 * have))
        capacity, block_width = grow(max(capacity, 1), self.capacity), grow(max(block_width, 1), self.block_width)
        stop_width = max(stop_width, self.stop_width)
        old = self.tensors() if self.full is not None else {}
        widths = {"marker": MAX_MARKER_TOKENS, "stop": stop_width, "blocks": block_width}
        dtypes = {"input_ids": torch.long, "positions": torch.long, "seed": torch.long,
                  "temperature": torch.float32, "top_p": torch.float32, "min_p": torch.float32,
                  "confidence": torch.float32}
        new = {}
        for name in _ROW_FIELDS:
            columns = _COLUMNS.get(name)
            shape = (capacity,) if columns is None else (capacity, widths[columns])
            t = torch.zeros(shape, dtype=dtypes.get(name, torch.int32), device=self.device)
            if name in old:
                src = old[name]
                (t[: src.shape[0], : src.shape[1]] if src.dim() == 2 else t[: src.shape[0]]).copy_(src)
            new[name] = t
        self.full = _decode_inputs(new)
        start = self.capacity if old else 0
        self.capacity, self.block_width, self.stop_width = capacity, block_width, stop_width
        self.pad(start, capacity)
        self.generation += 1

    def pad(self, start: int, end: int) -> None:
        """Rows start..end: DONE, one token of context in block 0, nothing written."""
        if end <= start:
            return
        full = self.full
        full.state.phase[start:end] = DONE
        full.context_lens[start:end] = 1
        full.positions[start:end] = 0
        full.input_ids[start:end] = 0
        full.block_tables[start:end] = 0

    def apply(self, update: BatchUpdate) -> None:
        """Bring the rows to the next batch: grow, close up, write joining rows and new block entries, pad."""
        self.ensure(update.capacity, update.block_width, update.stop_width)
        if update.reset:
            self.pad(0, self.capacity)
        host: HostFields = {}
        if update.keep:
            host["keep"] = (torch.long, update.keep, (len(update.keep),))
        if update.joins is not None:
            rows, values = update.joins
            host["join:rows"] = (torch.long, rows, (len(rows),))
            host.update({f"join:{name}": value for name, value in values.items()})
        block_rows, block_cols, block_ids = update.blocks
        if block_rows:
            host["block:rows"] = (torch.long, block_rows, (len(block_rows),))
            host["block:cols"] = (torch.long, block_cols, (len(block_cols),))
            host["block:ids"] = (torch.int32, block_ids, (len(block_ids),))
        if update.perm is not None:
            host["perm"] = (torch.long, update.perm, (len(update.perm),))
        dev = upload(host, self.device) if host else {}
        tensors = self.tensors()
        if update.keep:
            keep = dev["keep"]
            for t in tensors.values():
                t[: len(update.keep)] = t[keep]
        if update.joins is not None:
            rows = dev["join:rows"]
            for name, t in tensors.items():
                if name == "block_tables":
                    continue
                value = dev[f"join:{name}"]
                if t.dim() == 2 and value.shape[1] < t.shape[1]:  # widen: markers right-aligned, stop ids left
                    fill = {"marker": MARKER_PAD, "recent": RECENT_PAD, "stop_ids": STOP_PAD}[name]
                    wide = torch.full((value.shape[0], t.shape[1]), fill, dtype=t.dtype, device=t.device)
                    (wide[:, -value.shape[1] :] if name != "stop_ids" else wide[:, : value.shape[1]]).copy_(value)
                    value = wide
                t[rows] = value
        if block_rows:
            self.full.block_tables[dev["block:rows"], dev["block:cols"]] = dev["block:ids"]
        self.pad(*update.pad)
        self.n = update.n
        if update.perm is not None:
            identity = update.perm == list(range(update.n))
            self.perm = None if identity else dev["perm"]
