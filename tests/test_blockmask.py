"""The analytic lowering of attnopt masks to FlexAttention block metadata equals create_block_mask's
dense evaluation of the same mask, tile for tile (PARTIAL and FULL, forward and transposed)."""

from __future__ import annotations

import pytest
import torch

from attnopt import masks as M
from attnopt.blockmask import block_mask, lower

fa = pytest.importorskip("torch.nn.attention.flex_attention")

B, H = 2, 2


def _keep(m, ctx):
    return lambda b, h, q, kv: m.keep(b, h, q, kv, ctx)


def _dense(nums, idx, full_nums, full_idx):
    """(…, rows, cols) int8: 0 EMPTY, 1 PARTIAL, 2 FULL, from BCSR rows (only each row's valid prefix)."""
    cols = idx.shape[-1]
    out = torch.zeros((*idx.shape[:-1], cols + 1), dtype=torch.int8)
    for n, ix, val in ((nums, idx, 1), (full_nums, full_idx, 2)):
        valid = torch.arange(cols) < n[..., None]
        out.scatter_(-1, torch.where(valid, ix.long(), cols), val)
    # each block listed once: a block in both lists, or twice in one, would be a lowering bug
    assert torch.equal((out[..., :cols] == 1).sum(-1), nums.long().expand(out.shape[:-1]))
    assert torch.equal((out[..., :cols] == 2).sum(-1), full_nums.long().expand(out.shape[:-1]))
    return out[..., :cols]


def _tiles(bm):
    kv = _dense(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    q = _dense(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
    return kv.expand(B, H, -1, -1), q.expand(B, H, -1, -1)


def _masks(Sq: int, Sk: int) -> list[M.Mask]:
    lens = torch.tensor([Sk, max(Sk // 3, 1)])
    ms = [
        M.causal(),
        M.causal(align="top_left"),
        M.sliding_window(100),
        M.sliding_window(50, 70),
        M.sliding_window(0, 0, align="top_left"),
        M.prefix_lm(150),
        M.padding(lens),
        M.padding(torch.tensor([0, Sk])),
        M.left_padding(torch.tensor([0, Sk // 2])),
        M.left_padding(torch.tensor([Sk, 3])),
        M.cache_causal(torch.tensor([Sk, Sk // 2])),
        M.cache_causal(torch.tensor([Sk, 10]), left=40),
        M.document(
            torch.tensor([0, Sq // 3, Sq // 3, Sq]), cu_seqlens_k=torch.tensor([0, Sk // 4, Sk // 2, Sk])
        ),
        M.document_causal(torch.tensor([0, Sq // 2, Sq // 2, Sq]), torch.tensor([0, Sk // 7, Sk // 2, Sk])),
        M.causal() & M.padding(lens),
        M.sliding_window(30) | M.prefix_lm(64),
        (M.sliding_window(20) | M.sliding_window(0, 20) | M.causal(align="top_left"))
        & M.left_padding(torch.tensor([5, 77])),
        M.causal() & M.left_padding(torch.tensor([Sk - 1, 0])),
        (M.causal() | M.padding(torch.tensor([3, 0]))) & M.sliding_window(200, 10),
    ]
    if Sq == Sk:
        ms += [
            M.document(torch.tensor([0, Sq // 3, Sq // 3, Sq * 3 // 4, Sq])),
            M.document(torch.tensor([0, Sq // 2, Sq])) & M.causal(),
            M.document_causal(
                torch.tensor([0, Sq // 3, Sq // 3, Sq]), torch.tensor([0, Sq // 3, Sq // 3, Sk])
            ),
        ]
    return ms


SIZES = [(300, 300), (256, 512), (500, 200), (129, 1000), (1, 700), (128, 128), (700, 3)]


@pytest.mark.parametrize("Sq,Sk", SIZES)
def test_lowering_equals_create_block_mask(Sq, Sk):
    for m in _masks(Sq, Sk):
        ctx = M.MaskContext(B, H, Sq, Sk)
        if m.check(ctx):
            continue
        mine = lower(m, ctx).block_mask()
        ref = fa.create_block_mask(_keep(m, ctx), B, H, Sq, Sk, device="cpu")
        got, want = _tiles(mine), _tiles(ref)
        assert torch.equal(got[0], want[0]), f"{m} at Sq={Sq}, Sk={Sk}: forward tiles differ"
        assert torch.equal(got[1], want[1]), f"{m} at Sq={Sq}, Sk={Sk}: transposed tiles differ"


@pytest.mark.parametrize("block", [(128, 128), (64, 128), (128, 32), (16, 16)])
def test_other_block_sizes(block):
    Sq = Sk = 333
    for m in _masks(Sq, Sk):
        ctx = M.MaskContext(B, H, Sq, Sk)
        mine = lower(m, ctx, block).block_mask()
        ref = fa.create_block_mask(_keep(m, ctx), B, H, Sq, Sk, device="cpu", BLOCK_SIZE=block)
        assert [torch.equal(a, b) for a, b in zip(_tiles(mine), _tiles(ref))] == [True, True], (m, block)


def test_fallback_masks_are_evaluated():
    Sq, Sk = 300, 260
    g = torch.Generator().manual_seed(0)
    d = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
    d[:, :, :128, :128] = True
    d[0, :, 128:256, :] = False
    cases = [
        M.dense(d),
        M.custom(lambda b, h, q, kv: (kv * (h + 1)) % 7 != q % 5),
        M.custom(lambda b, h, q, kv: (kv <= q) & (h > 0)),
        M.causal() & M.dense(d),
    ]
    for m in cases:
        ctx = M.MaskContext(B, H, Sq, Sk)
        low = lower(m, ctx)
        assert low.path == "evaluated"
        ref = fa.create_block_mask(_keep(m, ctx), B, H, Sq, Sk, device="cpu")
        got, want = _tiles(low.block_mask()), _tiles(ref)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), m


def test_mask_mod_matches_keep():
    """The generated in-tile predicate is the mask, evaluated by Flex's own create_mask."""
    Sq, Sk = 200, 230
    for m in _masks(Sq, Sk):
        ctx = M.MaskContext(B, H, Sq, Sk)
        mm = lower(m, ctx).mask_mod()
        got = fa.create_mask(mm, B, H, Sq, Sk, device="cpu")
        want = m.tile(0, Sq, 0, Sk, ctx).expand(B, H, Sq, Sk)
        assert torch.equal(got, want), m


def test_band_path_metadata_is_compact():
    """A window's metadata stores O(blocks kept), not nQ × nK entries, and reads as the full format."""
    N = 64 * 1024
    ctx = M.MaskContext(1, 1, N, N)
    low = lower(M.sliding_window(255), ctx)
    assert low.path == "band"
    assert low.kv_indices.shape == (1, 1, N // 128, N // 128)
    assert low.kv_indices.untyped_storage().nbytes() < 64 * N  # vs 4 * (N / 128)^2 = 1 MiB dense
    assert int(low.kv_num_blocks.max()) == 2 and int(low.full_kv_num_blocks.max()) == 1


def test_public_block_mask_validates():
    with pytest.raises(ValueError, match="Q_LEN=0"):
        block_mask(M.causal(), 1, 1, 0, 10)
    with pytest.raises(ValueError, match="kv_lengths"):
        block_mask(M.padding(torch.tensor([5, 50])), 2, 1, 10, 10)
    bm = block_mask(lambda b, h, q, kv: kv <= q, 1, 1, 256, 256)  # a mask_mod, as create_block_mask takes
    assert int(bm.full_kv_num_blocks.sum()) == 1 and int(bm.kv_num_blocks.sum()) == 2


def test_block_mask_runs_in_users_compiled_flex_attention():
    """The public BlockMask (its mask_mod reads row tables) in a user's own compiled flex_attention on
    CPU, per-batch rows included: exact against the float64 reference."""
    import attnopt as ao

    B_, H_, S, D = 2, 2, 300, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B_, H_, S, D, generator=g) for _ in range(3))
    mask = M.document([0, 100, 100, 300]) & M.causal() & M.padding(torch.tensor([300, 170]))
    bm = block_mask(mask, B_, H_, S, S)
    out = torch.compile(fa.flex_attention, dynamic=False)(q, k, v, block_mask=bm)
    want = ao.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
