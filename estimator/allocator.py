"""A replay of PyTorch's CUDA caching allocator over a trace of allocations and frees.

Why: `torch.cuda.max_memory_allocated()` counts allocator *blocks* (sizes rounded up, small remainders not
split off), and `max_memory_reserved()` counts the cudaMalloc'd *segments*, which depend on the order of
allocations and frees (fragmentation). Both follow from the allocator's rules, so we run those rules instead
of fitting a ratio. The rules mirror c10/cuda/CUDACachingAllocator.cpp (default settings: no
max_split_size, no expandable segments, one stream):

- sizes round up to 512 bytes;
- requests <= 1 MiB come from the small pool, carved from 2 MiB segments;
- larger requests take the best-fitting cached block (smallest size, then lowest address); when none fits,
  a new segment is cudaMalloc'd: 20 MiB for requests under 10 MiB, else the request rounded up to 2 MiB;
- a found block is split when the remainder is >= 512 bytes (small pool) or > 1 MiB (large pool);
  otherwise the whole block is handed out and counted as allocated;
- a freed block merges with free neighbours of the same segment.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # requests up to this size use the small pool
SMALL_BUFFER = 2 << 20  # small-pool segment size
MIN_LARGE_ALLOC = 10 << 20  # requests below this get a LARGE_BUFFER segment
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * ((nbytes + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


class _Block:
    __slots__ = ("addr", "size", "prev", "next", "allocated", "small")

    def __init__(self, addr: int, size: int, small: bool):
        self.addr = addr
        self.size = size
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.small = small


@dataclass
class AllocatorStats:
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    segments: int = 0


# A free block's key in its pool: size first, then address (BlockComparatorSize), as one integer, which bisect
# compares faster than a (size, addr) tuple. Addresses stay below KEY_SPAN.
KEY_SPAN = 1 << 62


class CachingAllocatorModel:
    """Replays malloc/free calls; `stats` holds current and peak allocated/reserved bytes."""

    def __init__(self) -> None:
        self.stats = AllocatorStats()
        # Free blocks per pool, kept sorted by (size, addr) like the allocator's BlockComparatorSize.
        self._free: dict[bool, list[int]] = {True: [], False: []}
        self._by_key: dict[int, _Block] = {}
        self._live: dict[int, _Block] = {}
        self.live_handles = self._live.keys()  # handles allocated and not freed (a live view)
        self._next_addr = 1 << 40

    def malloc(self, handle: int, nbytes: int) -> int:
        """Allocate `nbytes` for `handle`; returns the block size counted as allocated."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, size * KEY_SPAN)  # the best fit: smallest size, then lowest address
        if i < len(pool):
            block = self._by_key.pop(pool.pop(i))
        else:
            block = self._new_segment(small, segment_size(size))
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.addr + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert_free(rest)
        block.allocated = True
        self._live[handle] = block
        st = self.stats
        st.allocated += block.size
        if st.allocated > st.peak_allocated:
            st.peak_allocated = st.allocated
        return block.size

    def free(self, handle: int) -> None:
        block = self._live.pop(handle)
        block.allocated = False
        self.stats.allocated -= block.size
        prev, following = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._remove_free(prev)
            prev.size += block.size
            prev.next = following
            if following is not None:
                following.prev = prev
            block = prev
        if following is not None and not following.allocated:
            self._remove_free(following)
            block.size += following.size
            block.next = following.next
            if following.next is not None:
                following.next.prev = block
        self._insert_free(block)

    def _new_segment(self, small: bool, size: int) -> _Block:
        block = _Block(self._next_addr, size, small)
        # Leave a gap so blocks of different segments never look adjacent.
        self._next_addr += size + ROUND_LARGE
        st = self.stats
        st.reserved += size
        st.segments += 1
        if st.reserved > st.peak_reserved:
            st.peak_reserved = st.reserved
        return block

    def _insert_free(self, block: _Block) -> None:
        key = block.size * KEY_SPAN + block.addr
        bisect.insort(self._free[block.small], key)
        self._by_key[key] = block

    def _remove_free(self, block: _Block) -> None:
        key = block.size * KEY_SPAN + block.addr
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, key)]
        del self._by_key[key]
