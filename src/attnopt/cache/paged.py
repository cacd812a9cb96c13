"""A paged KV pool: fixed-size pages, per-sequence page tables, reference counts and copy-on-write.

Storage is one key and one value tensor of shape (layers, Hkv, num_pages, page_size, D). Heads are the
outermost dimension *across the pool* so that a run of consecutive pages of one sequence is a plain
strided view ``k[layer][:, p:p+n].reshape(Hkv, n*page_size, D)`` (head-dim stride 1): attention reads
it in place, with no gather. The allocator keeps sequences in long runs (a sequence extends into the
page after its last one when that page is free; a new sequence starts at the first free run that holds
its reservation), so most sequences are one run.

Page tables come out in the two layouts the ecosystem uses:

* FlashInfer CSR (``csr``): ``kv_indptr`` [R+1], ``kv_indices`` [kv_indptr[-1]], ``kv_last_page_len`` [R],
  int32; a sequence's length is ``page_size*(pages-1) + last_page_len``.
* vLLM / ``torch.nn.attention.varlen`` block table (``block_table``): (R, max_pages) int32 padded with 0,
  plus ``seq_lens``; ``block_table_view(layer)`` gives the pool as (num_pages, page_size, Hkv, D).

Sharing: ``fork`` gives a new sequence that references the same pages (beams, parallel samples); the
prefix cache (``PrefixCache``) hands full prompt pages to new sequences. A page is freed when its last
reference goes. Writing into a shared page copies it first (copy-on-write), so sequences never see
each other's tokens. Nothing here copies a sequence's whole KV: appends write only the new tokens.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PagePool", "PoolFull", "PrefixCache"]


def page_slots(pages: list[int], start: int, end: int, page_size: int) -> Tensor:
    """Flat slots (page*page_size + offset) of tokens [start, end) of a sequence with page list ``pages``."""
    P = page_size
    pos = torch.arange(start, end)
    first = torch.tensor(pages[start // P : -(-end // P)], dtype=torch.int64)
    return first[pos // P - start // P] * P + pos % P


class PoolFull(RuntimeError):
    """The pool has too few free pages for the request (after evicting every unreferenced cached page)."""


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; allowed: an int >= {minimum}")
    return value


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    length: int = 0
    reserved: list[int] = field(default_factory=list)  # pages set aside for this sequence, used in order


class PagePool:
    """Keys and values of many sequences in fixed-size pages.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry (``value_dim`` defaults to
            ``head_dim``).
        num_pages: pages in the pool (each holds ``page_size`` tokens of every layer's K and V).
        page_size: tokens per page (16 by default; measured in BENCHMARKS.md "Serving").
        dtype, device: of the storage.
        fill: value written into the storage at creation (``None`` leaves it uninitialized). Free pages
            are never read, whatever they hold; tests fill them with NaN to prove it.

    Sequences are ints handed out by ``new_sequence``/``fork``. ``append(seq, n)`` makes room for n new
    tokens and returns their flat slots; ``write(layer, slots, k, v)`` stores them. ``free(seq)``
    drops the sequence's references.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        *,
        page_size: int = 16,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fill: float | None = None,
    ):
        self.num_layers = _int("num_layers", num_layers, 1)
        self.num_kv_heads = _int("num_kv_heads", num_kv_heads, 1)
        self.head_dim = _int("head_dim", head_dim, 1)
        self.value_dim = _int("value_dim", value_dim if value_dim is not None else head_dim, 1)
        self.num_pages = _int("num_pages", num_pages, 1)
        self.page_size = _int("page_size", page_size, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (num_layers, num_kv_heads, num_pages, page_size)
        self.k = torch.empty(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(*shape, self.value_dim, dtype=dtype, device=device)
        if fill is not None:
            self.k.fill_(fill)
            self.v.fill_(fill)
        self._ref = [0] * num_pages
        self._free = bytearray(b"\x01") * num_pages  # 1 = free: bytearray.find gives first-fit runs in C
        self._heap = list(range(num_pages))  # lowest free page first; stale entries skipped on pop
        self._n_free = num_pages
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self.prefix_cache: PrefixCache | None = None  # set by PrefixCache(pool): evicted when pages run out
        self.pages_copied = 0  # copy-on-write page copies so far
        self.peak_used_pages = 0  # most pages in use (referenced or reserved) at any time

    # ------------------------------------------------------------------------------------- geometry

    @staticmethod
    def bytes_per_page(
        num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, value_dim=None
    ) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_kv_heads * page_size * (head_dim + (value_dim or head_dim)) * item

    @property
    def page_bytes(self) -> int:
        return self.bytes_per_page(
            self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, self.k.dtype, self.value_dim
        )

    def flat_k(self, layer: int) -> Tensor:
        """Layer ``layer``'s keys as (Hkv, num_pages*page_size, D): slot s = page*page_size + offset."""
        return self.k[layer].view(self.num_kv_heads, self.num_pages * self.page_size, self.head_dim)

    def flat_v(self, layer: int) -> Tensor:
        return self.v[layer].view(self.num_kv_heads, self.num_pages * self.page_size, self.value_dim)

    def block_table_view(self, layer: int) -> tuple[Tensor, Tensor]:
        """(K, V) of one layer as (num_pages, page_size, Hkv, D) views: the layout of vLLM and torch varlen."""
        return self.k[layer].permute(1, 2, 0, 3), self.v[layer].permute(1, 2, 0, 3)

    # ------------------------------------------------------------------------------------ accounting

    @property
    def free_pages(self) -> int:
        """Pages not referenced by any sequence or the prefix cache, and not reserved."""
        return self._n_free

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._n_free

    def evictable_pages(self) -> int:
        return self.prefix_cache.evictable() if self.prefix_cache is not None else 0

    def available_pages(self) -> int:
        """Free pages plus cached pages nobody references (evicted on demand)."""
        return self._n_free + self.evictable_pages()

    def refcount(self, page: int) -> int:
        return self._ref[page]

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def pages(self, seq: int) -> list[int]:
        return list(self._get(seq).pages)

    def length(self, seq: int) -> int:
        return self._get(seq).length

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except (KeyError, TypeError):
            raise KeyError(f"sequence {seq!r} is not in the pool (freed, or never created)") from None

    # ------------------------------------------------------------------------------------ allocation

    def _take(self, page: int) -> None:
        self._free[page] = 0
        self._ref[page] = 1
        self._n_free -= 1
        self.peak_used_pages = max(self.peak_used_pages, self.num_pages - self._n_free)

    def _release(self, page: int) -> None:
        self._ref[page] -= 1
        if self._ref[page] == 0:
            self._give_back([page])

    def _give_back(self, pages: list[int]) -> None:
        """Unreferenced (or reserved, unused) pages become free."""
        for page in pages:
            self._free[page] = 1
            self._n_free += 1
            heapq.heappush(self._heap, page)

    def _set_aside(self, n: int, after: int | None) -> list[int]:
        """Take ``n`` free pages, unreferenced, as one run after ``after`` when the pool has one."""
        pages = []
        for i in range(n):
            after = self._pick(after, n - i)
            self._free[after] = 0
            self._n_free -= 1
            pages.append(after)
        self.peak_used_pages = max(self.peak_used_pages, self.num_pages - self._n_free)
        return pages

    def _incref(self, page: int) -> None:
        assert self._ref[page] > 0, f"page {page} is free"
        self._ref[page] += 1

    def _ensure_free(self, n: int) -> None:
        """Make ``n`` pages free, evicting unreferenced cached pages if needed; if even that is not enough,
        raise ``PoolFull`` having changed nothing."""
        if n > self._n_free and n <= self._n_free + self.evictable_pages():
            self.prefix_cache.evict(n - self._n_free)
        if n > self._n_free:
            raise PoolFull(
                f"the KV pool needs {n} free pages of {self.page_size} tokens and has {self._n_free} "
                f"(of {self.num_pages}; {self.used_pages} in use). HINT: give the pool more memory "
                f"(memory_budget / num_pages), or admit fewer tokens at once"
            )

    def _pick(self, after: int | None, run: int) -> int:
        """A free page: the one after ``after`` if free, else the start of the first free run of ``run``
        pages, else the lowest free page."""
        if after is not None and after + 1 < self.num_pages and self._free[after + 1]:
            return after + 1
        if run > 1:
            start = self._free.find(b"\x01" * run)
            if start >= 0:
                return start
        while True:
            page = heapq.heappop(self._heap)
            if self._free[page]:
                return page

    def new_sequence(self) -> int:
        seq = self._next_id
        self._next_id += 1
        self._seqs[seq] = _Seq()
        return seq

    def attach(self, seq: int, pages: list[int], tokens: int) -> None:
        """Give an empty sequence existing full pages (a cached prefix) holding ``tokens`` tokens."""
        s = self._get(seq)
        if s.pages or s.length:
            raise ValueError(f"attach: sequence {seq} is not empty ({s.length} tokens)")
        if tokens != len(pages) * self.page_size:
            raise ValueError(
                f"attach: {len(pages)} pages hold {len(pages) * self.page_size} tokens, not {tokens}"
            )
        for p in pages:
            self._incref(p)
        s.pages = list(pages)
        s.length = tokens

    def reserve(self, seq: int, n_pages: int) -> None:
        """Set ``n_pages`` pages aside for ``seq``'s future tokens, as one run when the pool has one.

        Its appends use them first, in order, so the sequence stays one contiguous run however requests
        interleave; later appends cannot fail for lack of pages while reserved ones remain. Unused
        reserved pages go back to the pool with ``free``. Raises ``PoolFull`` (nothing changed) when the
        pages are not there even after evicting unreferenced cached pages.
        """
        s = self._get(seq)
        n_pages = _int("n_pages", n_pages, 0)
        self._ensure_free(n_pages)
        after = s.reserved[-1] if s.reserved else (s.pages[-1] if s.pages else None)
        s.reserved.extend(self._set_aside(n_pages, after))

    def reserved(self, seq: int) -> int:
        """Pages set aside for ``seq`` and not used yet."""
        return len(self._get(seq).reserved)

    def append(self, seq: int, n: int, *, run_hint: int = 0) -> Tensor:
        """Make room for ``n`` new tokens of ``seq``; return their flat slots (int64, (n,)).

        Uses the sequence's reserved pages first, then takes free pages (extending its last run when it
        can). Copies the last page first if it is shared (copy-on-write). Raises ``PoolFull`` before
        changing anything if the pages are not there. ``run_hint`` asks for that many contiguous pages
        when a new run starts.
        """
        s = self._get(seq)
        n = _int("n", n, 0)
        P = self.page_size
        fill = s.length % P  # tokens already in the last page (0: it is full or there is none)
        room = (P - fill) % P if s.pages else 0
        new_pages = self.pages_for(max(0, n - room))
        cow = room > 0 and n > 0 and self._ref[s.pages[-1]] > 1
        from_free = max(0, new_pages + int(cow) - len(s.reserved))
        self._ensure_free(from_free)
        if cow:
            self._copy_on_write(s)
        want = max(new_pages, run_hint)
        for _ in range(new_pages):
            if s.reserved:
                page = s.reserved.pop(0)
                self._ref[page] = 1
            else:
                page = self._pick(s.pages[-1] if s.pages else None, want)
                self._take(page)
            s.pages.append(page)
            want -= 1
        start = s.length
        s.length += n
        return self.slots(seq, start, s.length)

    def _copy_on_write(self, s: _Seq) -> None:
        old = s.pages[-1]
        if s.reserved:
            new = s.reserved.pop(0)
            self._ref[new] = 1
        else:
            new = self._pick(s.pages[-2] if len(s.pages) > 1 else None, 1)
            self._take(new)
        self.k[:, :, new].copy_(self.k[:, :, old])
        self.v[:, :, new].copy_(self.v[:, :, old])
        s.pages[-1] = new
        self._release(old)
        self.pages_copied += 1

    def slots(self, seq: int, start: int, end: int) -> Tensor:
        """Flat slots (page*page_size + offset) of tokens [start, end) of ``seq``, int64."""
        s = self._get(seq)
        if not 0 <= start <= end <= s.length:
            raise ValueError(f"slots: [{start}, {end}) is outside sequence {seq}'s {s.length} tokens")
        return page_slots(s.pages, start, end, self.page_size).to(self.k.device)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store keys (Hkv, n, D) and values (Hkv, n, Dv) at flat ``slots`` (n,) of ``layer``."""
        self.flat_k(layer).index_copy_(1, slots, k)
        self.flat_v(layer).index_copy_(1, slots, v)

    def fork(self, seq: int) -> int:
        """A new sequence sharing every page of ``seq`` (its next write into the shared last page copies it)."""
        s = self._get(seq)
        child = self.new_sequence()
        for p in s.pages:
            self._incref(p)
        self._seqs[child].pages = list(s.pages)
        self._seqs[child].length = s.length
        return child

    def relocate(self, seq: int) -> int:
        """Move ``seq`` into one fresh contiguous run: copies of all its pages, then its reservation.

        Shared pages stay with their other owners; the sequence gets private copies. Returns the number
        of pages copied. Benchmarks use it to lay sequences out as if each had been prefilled alone;
        generation never needs it (writes into shared pages copy on demand). Raises ``PoolFull`` with
        nothing changed when the pool cannot hold the copies.
        """
        s = self._get(seq)
        n, total = len(s.pages), len(s.pages) + len(s.reserved)
        if total - len(s.reserved) > self.available_pages():
            raise PoolFull(
                f"relocate: sequence {seq} needs {n} more pages; the pool has {self.available_pages()}"
            )
        self._give_back(s.reserved)  # its reservation moves too: give it back, then take the new run
        s.reserved = []
        self._ensure_free(total)
        new = self._set_aside(total, None)
        old = torch.tensor(s.pages, dtype=torch.int64, device=self.k.device)
        dst = torch.tensor(new[:n], dtype=torch.int64, device=self.k.device)
        self.k.index_copy_(2, dst, self.k.index_select(2, old))
        self.v.index_copy_(2, dst, self.v.index_select(2, old))
        for p in s.pages:
            self._release(p)
        for p in new[:n]:
            self._ref[p] = 1
        s.pages, s.reserved = new[:n], new[n:]
        self.pages_copied += n
        return n

    def truncate(self, seq: int, length: int) -> None:
        """Drop tokens past ``length`` (pages no longer needed lose this sequence's reference)."""
        s = self._get(seq)
        if not 0 <= length <= s.length:
            raise ValueError(f"truncate: length {length} outside [0, {s.length}] for sequence {seq}")
        keep = self.pages_for(length)
        for p in s.pages[keep:]:
            self._release(p)
        del s.pages[keep:]
        s.length = length

    def free(self, seq: int) -> None:
        """Drop the sequence; its pages go back to the pool when no one else references them."""
        s = self._seqs.pop(seq, None)
        if s is None:
            raise KeyError(f"sequence {seq!r} is not in the pool (freed twice, or never created)")
        for p in s.pages:
            self._release(p)
        self._give_back(s.reserved)

    # ----------------------------------------------------------------------------------- page tables

    def csr(self, seqs: list[int], device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """FlashInfer-style (kv_indptr [R+1], kv_indices, kv_last_page_len [R]), int32."""
        indptr, indices, last = [0], [], []
        P = self.page_size
        for seq in seqs:
            s = self._get(seq)
            indices.extend(s.pages)
            indptr.append(len(indices))
            last.append(s.length - P * (len(s.pages) - 1) if s.pages else 0)
        dev = device if device is not None else self.k.device
        mk = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
        return mk(indptr), mk(indices), mk(last)

    def block_table(self, seqs: list[int], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """vLLM / torch varlen-style (block_table (R, max_pages) int32 padded with 0, seq_lens (R,) int32)."""
        rows = [self._get(s).pages for s in seqs]
        width = max((len(r) for r in rows), default=0)
        table = [r + [0] * (width - len(r)) for r in rows]
        dev = device if device is not None else self.k.device
        lens = [self._get(s).length for s in seqs]
        return (
            torch.tensor(table, dtype=torch.int32, device=dev).reshape(len(seqs), width),
            torch.tensor(lens, dtype=torch.int32, device=dev),
        )

    def check(self) -> None:
        """Internal consistency (tests): every reference is accounted for, free pages are unreferenced."""
        refs = [0] * self.num_pages
        held = set()
        for s in self._seqs.values():
            assert len(s.pages) == self.pages_for(s.length), (len(s.pages), s.length)
            for p in s.pages:
                refs[p] += 1
            for p in s.reserved:
                assert p not in held and not self._free[p] and self._ref[p] == 0, f"reserved page {p}"
                held.add(p)
        if self.prefix_cache is not None:
            for p in self.prefix_cache.pages():
                refs[p] += 1
        assert refs == self._ref, "reference counts disagree with the sequences and the prefix cache"
        free = [i for i in range(self.num_pages) if self._free[i]]
        assert all(self._ref[i] == 0 for i in free) and len(free) == self._n_free
        assert all(self._ref[i] > 0 or i in held for i in range(self.num_pages) if not self._free[i])


class _Node:
    __slots__ = ("children", "last_used", "page", "parent", "tokens")

    def __init__(self, page: int, tokens: tuple[int, ...], parent: _Node | None):
        self.page, self.tokens, self.parent = page, tokens, parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_used = 0


class PrefixCache:
    """Full pages of token ids already in the pool, in a tree keyed by each page's tokens (a radix tree at
    page granularity, as SGLang's RadixAttention and vLLM's prefix caching).

    A page's keys and values depend on every token before it (positions, attention), so a page is found
    only through the exact chain of pages before it: ``match(prompt)`` walks the tree from the root.
    The cache holds one reference per page; a cached page that no sequence uses is evicted (leaves
    first, least recently used first) when the pool runs out of free pages.
    """

    def __init__(self, pool: PagePool):
        self.pool = pool
        pool.prefix_cache = self
        self.root = _Node(-1, (), None)
        self._nodes: dict[int, _Node] = {}  # page -> node
        self._clock = 0
        self.hits = 0  # tokens served from the cache so far

    def pages(self) -> list[int]:
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def evictable(self) -> int:
        """Cached pages ``evict`` can free: referenced by nothing but the cache, and so are all the pages
        after them in the tree (eviction goes leaves first)."""

        def count(node: _Node) -> tuple[int, bool]:  # (evictable pages below and at node, whole subtree?)
            total, whole = 0, True
            for child in node.children.values():
                n, w = count(child)
                total += n
                whole = whole and w
            if node is self.root:
                return total, whole
            whole = whole and self.pool.refcount(node.page) == 1
            return total + whole, whole

        stack_safe = len(self._nodes) < 500  # deep chains (long prompts): iterate instead of recursing
        return count(self.root)[0] if stack_safe else self._evictable_iterative()

    def _evictable_iterative(self) -> int:
        order, stack = [], [self.root]
        while stack:  # parents before children
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        whole: dict[int, bool] = {}
        total = 0
        for node in reversed(order):  # children before parents
            ok = all(whole[id(c)] for c in node.children.values())
            if node is not self.root:
                ok = ok and self.pool.refcount(node.page) == 1
                total += ok
            whole[id(node)] = ok
        return total

    def match(self, tokens: list[int], limit: int | None = None) -> list[int]:
        """Pages holding the longest cached prefix of ``tokens`` (whole pages, at most ``limit`` tokens)."""
        P = self.pool.page_size
        n = len(tokens) if limit is None else min(limit, len(tokens))
        node, out = self.root, []
        self._clock += 1
        for start in range(0, n - n % P, P):
            child = node.children.get(tuple(tokens[start : start + P]))
            if child is None:
                break
            child.last_used = self._clock
            out.append(child.page)
            node = child
        return out

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Record that ``pages`` hold the full pages of ``tokens`` (a sequence's first pages). Returns how
        many pages were newly cached."""
        P = self.pool.page_size
        node, added = self.root, 0
        self._clock += 1
        for i, page in enumerate(pages[: len(tokens) // P]):
            key = tuple(tokens[i * P : (i + 1) * P])
            child = node.children.get(key)
            if child is None:
                if page in self._nodes:  # this page already caches another chain: leave it there
                    return added
                child = _Node(page, key, node)
                node.children[key] = child
                self._nodes[page] = child
                self.pool._incref(page)
                added += 1
            elif child.page != page:  # the same tokens already cached in another page: keep that one
                pass
            child.last_used = self._clock
            node = child
        return added

    def evict(self, n: int) -> int:
        """Free up to ``n`` pages that only the cache references, least recently used leaves first."""
        heap = [
            (nd.last_used, p)
            for p, nd in self._nodes.items()
            if not nd.children and self.pool.refcount(p) == 1
        ]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            _, page = heapq.heappop(heap)
            node = self._nodes.get(page)
            if node is None or node.children or self.pool.refcount(page) != 1:
                continue
            parent = node.parent
            del parent.children[node.tokens]
            del self._nodes[page]
            self.pool._release(page)
            freed += 1
            if parent is not self.root and not parent.children and self.pool.refcount(parent.page) == 1:
                heapq.heappush(heap, (parent.last_used, parent.page))
        return freed

    def clear(self) -> None:
        """Drop every cached page reference."""
        for page in list(self._nodes):
            self.pool._release(page)
        self._nodes.clear()
        self.root.children.clear()
