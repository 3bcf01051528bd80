"""Per-sequence block tables on top of the native refcounted allocator, with prefix caching.

A full block is identified by a chained hash of its tokens and of every token before it,
so two sequences with the same prompt (the n samples of one request, or repeated prompts)
share the K/V blocks of their common full blocks instead of recomputing them (vLLM's
automatic prefix caching, by content hash).
"""
from __future__ import annotations

from elastic_decode._C import BlockAllocator

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _prefix_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the full blocks that may come from the cache.

        The last token is always recomputed (its logits are needed), so a block counts only
        if it ends before it.
        """
        hashes, parent, bs = [], 0, self.block_size
        for j in range((len(seq) - 1) // bs):
            parent = BlockAllocator.hash_tokens(parent, seq.token_ids[j * bs : (j + 1) * bs])
            hashes.append(parent)
        return hashes

    @staticmethod
    def _reuses_prefix(seq: Sequence) -> bool:
        """A prompt whose logprobs are asked for is computed whole (a cached block has no hidden states)."""
        return seq.params.prompt_logprobs is None or seq.prompt_logprobs is not None

    def _forked(self, seq: Sequence) -> list[int]:
        """The blocks a DEER probe shares with the trace it forks: the trace's full blocks up to the fork point
        (their K/V stays: a trace never writes below its length), none when the trace no longer holds them."""
        parent = seq.probe_of
        if parent is None or not parent.block_table or parent.num_generated < seq.probe_at:
            return []
        shared = min((len(seq) - 1) // self.block_size, (parent.num_prompt_tokens + seq.probe_at) // self.block_size,
                     len(parent.block_table))
        return parent.block_table[:shared]

    def blocks_to_admit(self, seq: Sequence) -> int:
        """Free blocks that admitting `seq` would take (shared blocks in use cost nothing)."""
        if seq.probe_of is not None:
            return self._blocks_for(len(seq)) - len(self._forked(seq))
        in_use = 0
        for h in self._prefix_hashes(seq) if self._reuses_prefix(seq) else ():
            block = self.allocator.peek(h)
            if block < 0:
                break
            in_use += self.allocator.refcount(block) > 0
        return self._blocks_for(len(seq)) - in_use

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_to_admit(seq) <= self.allocator.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks (a DEER probe: its trace's)."""
        assert not seq.block_table, "allocate() on a sequence that holds blocks"
        if seq.probe_of is not None:  # shares the trace's full blocks; registers nothing (the probe is thrown away)
            shared = self._forked(seq)
            self.allocator.fork(shared)
            seq.num_cached_tokens = len(shared) * self.block_size
            seq.block_table = shared + self.allocator.allocate(self._blocks_for(len(seq)) - len(shared))
            return
        table: list[int] = []
        hashes = self._prefix_hashes(seq)
        for h in hashes if self._reuses_prefix(seq) else ():
            block = self.allocator.lookup(h)
            if block < 0:
                break
            table.append(block)
        seq.num_cached_tokens = len(table) * self.block_size
        table += self.allocator.allocate(self._blocks_for(len(seq)) - len(table))
        # Every full block of this sequence is computed by this prefill: make it findable.
        parent, bs = 0, self.block_size
        for j in range(len(seq) // bs):
            parent = hashes[j] if j < len(hashes) else BlockAllocator.hash_tokens(parent, seq.token_ids[j * bs : (j + 1) * bs])
            self.allocator.register_hash(table[j], parent)
        seq.block_table = table
        seq.hashed_tokens = len(seq) // bs * bs

    def _blocks_to_append(self, seq: Sequence, steps: int) -> int:
        # `steps` decode steps write positions len(seq) - 1 .. len(seq) + steps - 2.
        return max(0, self._blocks_for(len(seq) + steps - 1) - len(seq.block_table))

    def can_append(self, seq: Sequence, steps: int = 1) -> bool:
        """Whether the next `steps` decode steps of `seq` have room."""
        return self._blocks_to_append(seq, steps) <= self.allocator.num_free

    def append_slots(self, seq: Sequence, steps: int = 1) -> None:
        """Reserve the KV slots of the next `steps` decode steps."""
        need = self._blocks_to_append(seq, steps)
        if need:
            seq.block_table += self.allocator.allocate(need)

    def free(self, seq: Sequence) -> None:
        # Tail first: the LRU free list then evicts a sequence's last blocks before its
        # prefix, which is the part other requests are likely to share.
        self.allocator.free(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_prefix_cache()
