import pytest
import torch

from diffbias.models.attention import (
    check_windows_fit,
    neighborhood_attention,
    neighborhood_attention_reference,
    neighborhood_mask,
    parse_attention_spec,
    select_path,
    window_start,
)


def test_parse_spec_seed_table4():
    assert parse_attention_spec("3,5,7,9,11,13,G,G,G,G,G,G", 12) == [3, 5, 7, 9, 11, 13] + [None] * 6
    assert parse_attention_spec(None, 3) == [None] * 3
    assert parse_attention_spec(["g", 3], 2) == [None, 3]


@pytest.mark.parametrize("spec,msg", [("3,G", "depth 3"), ("4,G,G", "odd"), ("x,G,G", "neither"), ("0,G,G", "odd")])
def test_parse_spec_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_attention_spec(spec, 3)


def test_window_larger_than_grid_is_an_error():
    with pytest.raises(ValueError, match="larger than the 8x8"):
        check_windows_fit([3, 9], (8, 8))


def test_natten_window_slides_inward_and_every_query_sees_k_squared_keys():
    assert window_start(7, 3).tolist() == [0, 0, 1, 2, 3, 4, 4]
    mask = neighborhood_mask(7, 5, 3)
    assert (mask.sum(1) == 9).all()  # no clipping at the borders
    # corner query (0,0) attends rows 0-2 and columns 0-2
    keys = mask[0].nonzero().flatten().tolist()
    assert keys == [y * 5 + x for y in range(3) for x in range(3)]
    # this differs from the clipped "distance <= r" operator, where the corner would see 4 keys
    assert mask[0].sum() != 4


@pytest.mark.parametrize("grid,k", [((8, 8), 3), ((8, 8), 5), ((8, 8), 7), ((16, 16), 5), ((6, 10), 3), ((32, 32), 13)])
@pytest.mark.parametrize("impl", ["dense", "tiled", "auto"])
def test_local_attention_matches_brute_force(grid, k, impl):
    g = torch.Generator().manual_seed(k)
    H, W = grid
    q, kk, v = (torch.randn(2, 3, H * W, 7, generator=g) for _ in range(3))  # odd head dim, like DiT-XS's 63
    ref = neighborhood_attention_reference(q, kk, v, H, W, k)
    out = neighborhood_attention(q, kk, v, H, W, k, impl=impl)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_local_attention_gradients_match_brute_force():
    H = W = 8
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 2, H * W, 4, generator=g) for _ in range(3)]
    grads = []
    for impl in ("reference", "tiled"):
        qkv = [t.clone().requires_grad_() for t in base]
        neighborhood_attention(*qkv, H, W, 3, impl=impl).square().sum().backward()
        grads.append([t.grad for t in qkv])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid,k", [((8, 8), 3), ((6, 10), 5), ((16, 16), 7)])
def test_flex_attention_block_mask_matches_brute_force(grid, k):
    """The CUDA path's mask_mod, run eagerly on CPU: same NATTEN neighbourhoods as the reference."""
    g = torch.Generator().manual_seed(3)
    H, W = grid
    q, kk, v = (torch.randn(1, 2, H * W, 63, generator=g) for _ in range(3))  # DiT-XS/1 head dim
    out = neighborhood_attention(q, kk, v, H, W, k, impl="flex")
    torch.testing.assert_close(out, neighborhood_attention_reference(q, kk, v, H, W, k), atol=2e-6, rtol=1e-5)


def test_auto_path_picks_tiles_where_they_save_time():
    # 32x32 grid: 8x8 query tiles for every window of the study (halo 20x20 at k = 13 is 0.39 of L)
    assert [select_path(32, 32, k)[:2] for k in (3, 7, 13)] == [("tiled", 8)] * 3
    # 16x16 grid: k = 3 tiles; k = 5's halo (12x12) is over half the grid, so the dense kernel runs
    assert select_path(16, 16, 3)[0] == "tiled" and select_path(16, 16, 5)[0] == "dense"
    assert select_path(8, 8, 3)[0] == "dense"  # no tile smaller than the grid leaves a short halo
    assert select_path(32, 32, 7, device_type="cuda")[0] == "flex"
    assert select_path(32, 32, 7, impl="tiled", device_type="cuda")[0] == "tiled"
    with pytest.raises(ValueError, match="unknown local attention implementation"):
        select_path(8, 8, 3, impl="fast")
