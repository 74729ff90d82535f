"""Who holds which KV block: a free list over the paged pool (engine/paged_kv.py).

A sequence reserves every block it can ever need when it is admitted (prompt +
max_new_tokens + the one-token lookahead of a self-advancing step), so a running
sequence never waits for memory and nothing is ever preempted; what it does not reserve
is `max_positions`, so short requests pack densely. Block 0 is the scratch block and is
never lent. Not thread-safe: the engine calls it under its own lock.
"""

from __future__ import annotations

from engine.errors import ResourceExhausted
from engine.paged_kv import BLOCK_SIZE, NULL_BLOCK, blocks_for


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if n_blocks < 2:
            raise ValueError(f"need >= 2 blocks (block {NULL_BLOCK} is scratch), got {n_blocks}")
        self.n_blocks, self.block_size = n_blocks, block_size
        # a stack, lowest ids on top: reuse recently freed (cache-warm) blocks first
        self._free = [b for b in range(n_blocks - 1, 0, -1)]
        self._lent: set[int] = set()

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_lendable(self) -> int:
        """Blocks an empty pool can lend: every block but the scratch one."""
        return self.n_blocks - 1

    def blocks_needed(self, n_tokens: int) -> int:
        return blocks_for(n_tokens, self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_needed(n_tokens) <= len(self._free)

    def allocate(self, n_tokens: int) -> list[int]:
        """Blocks for n_tokens positions, or ResourceExhausted (nothing is taken)."""
        need = self.blocks_needed(n_tokens)
        if need > len(self._free):
            raise ResourceExhausted(f"KV pool: {need} blocks needed, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(need)]
        self._lent.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give blocks back. A block that is not lent is a bug in the caller: refused
        loudly instead of being lent twice later."""
        bad = [b for b in blocks if b not in self._lent]
        if bad:
            raise RuntimeError(f"freeing blocks that are not lent: {bad[:4]}")
        self._lent.difference_update(blocks)
        self._free.extend(reversed(blocks))
