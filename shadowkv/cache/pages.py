"""One page allocator for every paged pool: reference-counted fixed-size pages.

Dense K/V blocks, ShadowKV's factor/landmark pages, buffer blocks, value-store pages and basis
slots all come from a ``PageAllocator``. A page is handed out with one reference; ``retain``
adds one (a page two sequences share), ``release`` drops one and recycles the page when none is
left. Which pages a sequence holds is the sequence's business (``cache.base.SeqRecord``), not the
allocator's.
"""

from __future__ import annotations

from collections.abc import Iterable

from shadowkv.cache.errors import CacheCapacityError


class PageAllocator:
    """Pages ``[first, num_pages)`` of one pool, with reference counts.

    ``null_page=True`` keeps page 0 out (a zeroed page that unused page-table entries point
    at, so they always read finite memory). Freed pages are reused first (last freed, first
    reused); fresh ones are counted, not listed, so a huge pool costs nothing until it is used.
    ``unit`` (what one page holds) and ``fix`` (what the user can do) go into capacity errors;
    ``page_bytes`` and ``on_host`` (host memory, not the compute device's) are for accounting.
    """

    def __init__(
        self,
        name: str,
        num_pages: int,
        unit: str,
        fix: str,
        page_bytes: int = 0,
        null_page: bool = True,
        on_host: bool = False,
    ) -> None:
        self.name, self.unit, self.fix = name, unit, fix
        self.page_bytes, self.on_host = page_bytes, on_host
        self.first = 1 if null_page else 0
        self.num_pages = max(self.first, num_pages)
        self._recycled: list[int] = []
        self._next_fresh = self.first
        self._refs: dict[int, int] = {}  # page -> references, for pages in use

    @property
    def capacity(self) -> int:
        """Pages that can be handed out at all (0 for a pool holding only its null page)."""
        return self.num_pages - self.first

    @property
    def num_free(self) -> int:
        return len(self._recycled) + self.num_pages - self._next_fresh

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def shortfall(self, num: int) -> str | None:
        """Why ``num`` pages cannot be handed out now, or None when they can."""
        if num <= self.num_free:
            return None
        return (
            f"{self.name}: needs {num} pages of {self.unit}, {self.num_free} free of "
            f"{self.capacity}; {self.fix}"
        )

    def alloc(self, num: int) -> list[int]:
        """``num`` pages with one reference each; raises ``CacheCapacityError`` when short."""
        why = self.shortfall(num)
        if why is not None:
            raise CacheCapacityError(why)
        reuse = min(num, len(self._recycled))
        pages = [self._recycled.pop() for _ in range(reuse)]
        pages += range(self._next_fresh, self._next_fresh + num - reuse)
        self._next_fresh += num - reuse
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, pages: Iterable[int]) -> None:
        """One more reference to pages already handed out (sharing them)."""
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"{self.name}: page {p} is not in use, so it cannot be shared")
            self._refs[p] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; pages left with none are free again."""
        freed = []
        for p in pages:
            left = self._refs[p] - 1
            if left:
                self._refs[p] = left
            else:
                del self._refs[p]
                freed.append(p)
        self._recycled.extend(reversed(freed))

    def retire(self) -> None:
        """Hand out nothing more: the memory behind the pool could not be had (no page may be
        in use)."""
        if self._refs:
            raise RuntimeError(f"{self.name}: cannot retire a pool with pages in use")
        self.num_pages, self._recycled, self._next_fresh = self.first, [], self.first

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)
