import math

import pytest
import torch

from diffbias.io import write_parquet
from diffbias.metrics.attention_maps import (
    attention_analysis,
    attention_maps,
    infer_grid,
    locality_metrics,
    normalise_for_display,
    plot_attention_maps,
    recording_attention,
)
from diffbias.models.attention import neighborhood_mask
from diffbias.models.dit import PCAAttention
from diffbias.models.registry import build_model
from diffbias.pca_basis import collect_pca_basis, streaming_pca

GRID = (4, 4)
L = 16


def tiny_dit(**options):
    torch.manual_seed(0)
    model = build_model(preset="DiT-T/2", input_size=8, in_channels=1, options=options).eval()
    with torch.no_grad():  # adaLN-Zero blocks are the identity at init: perturb so that maps vary with depth
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0.0, 0.1)
    return model


def images(n=4, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------
# Locality metrics on hand-made maps
# ---------------------------------------------------------------------------------------------------


def test_identity_and_uniform_maps():
    ident = locality_metrics(torch.eye(L), GRID, radii=(0, 1, 2))
    assert ident["mass_r0"] == pytest.approx(1.0)
    assert ident["mass_r1"] == pytest.approx(1.0)
    assert ident["mean_distance"] == pytest.approx(0.0)
    assert ident["entropy"] == pytest.approx(0.0)

    uni = locality_metrics(torch.full((L, L), 1.0 / L), GRID, radii=(1,))
    assert uni["entropy"] == pytest.approx(math.log(L), rel=1e-6)
    # keys within Chebyshev radius 1 on a 4x4 grid: 4 corners x 4 + 8 edges x 6 + 4 inner x 9 = 100
    assert uni["mass_r1"] == pytest.approx(100 / (L * L), rel=1e-6)


def test_distance_per_head_and_batch_average():
    to_origin = torch.zeros(L, L)
    to_origin[:, 0] = 1.0  # every query attends the top-left token
    expected = sum(math.hypot(y, x) for y in range(4) for x in range(4)) / L
    maps = torch.stack([torch.eye(L), to_origin])[None]  # (1, 2 heads, L, L)
    per = locality_metrics(maps, GRID, per_head=True)
    assert per["mean_distance"][0] == pytest.approx(0.0)
    assert per["mean_distance"][1] == pytest.approx(expected, rel=1e-6)
    assert per["mass_r1"].tolist() == pytest.approx([1.0, 4 / L])
    mean = locality_metrics(maps, GRID)
    assert mean["mean_distance"] == pytest.approx(expected / 2, rel=1e-6)
    # batch average: an identity image and a to-origin image
    batch = torch.stack([torch.eye(L)[None], to_origin[None]])  # (2, 1, L, L)
    assert locality_metrics(batch, GRID)["mean_distance"] == pytest.approx(expected / 2, rel=1e-6)


def test_extra_tokens_and_grid_inference():
    assert infer_grid(64) == ((8, 8), 0)
    assert infer_grid(66) == ((8, 8), 2)
    assert infer_grid(32, (4, 8)) == ((4, 8), 0)
    with_extra = torch.zeros(L + 1, L + 1)
    with_extra[1:, 1:] = torch.eye(L)
    with_extra[0, 0] = 1.0
    m = locality_metrics(with_extra, GRID)
    assert m["mass_r1"] == pytest.approx(1.0) and m["mean_distance"] == pytest.approx(0.0)


def test_normalise_for_display():
    out = normalise_for_display(torch.tensor([[0.2, 0.4], [0.6, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert normalise_for_display(torch.full((3, 3), 0.5)).abs().max() == 0


def test_log_normalise_spreads_small_values_over_decades():
    from diffbias.metrics.attention_maps import LOG_DECADES, log_normalise_for_display

    out = log_normalise_for_display(torch.tensor([0.0, 1e-6, 1e-3, 1e-2, 1.0]))
    # after the linear [0, 1] step: 1 -> 1, 10^-k -> 1 - k/decades, anything below 10^-decades -> 0
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1 - 3 / LOG_DECADES, 1 - 2 / LOG_DECADES, 1.0]))


# ---------------------------------------------------------------------------------------------------
# Recording on a tiny DiT
# ---------------------------------------------------------------------------------------------------


def test_recording_global_and_local_layers():
    model = tiny_dit(attention="3,G,3,G,G,G")
    x = images(3)
    maps = attention_maps(model, x, 500)
    assert len(maps) == 6
    mask = neighborhood_mask(*GRID, 3)
    for i, m in enumerate(maps):
        assert m.shape == (3, 2, L, L)
        torch.testing.assert_close(m.sum(-1), torch.ones(3, 2, L))
        if i in (0, 2):  # local 3x3 layers: zero outside each query's window
            assert m[..., ~mask].abs().max() == 0
        else:
            assert (m[..., ~mask] > 0).any()
    # flags restored and maps dropped afterwards
    with recording_attention(model) as modules:
        assert len(modules) == 6 and all(m.record_attention for _, m in modules)
        assert modules[0][0] == "blocks.0.attn"
    assert all(not m.record_attention and m.attention_map is None for _, m in modules)
    assert not any("record_attention" in m.__dict__ for _, m in modules)


def test_shared_blocks_are_recorded_once_per_use():
    model = tiny_dit(share_blocks="2:1")
    maps = attention_maps(model, images(2), torch.tensor([10, 900]))
    assert len(maps) == 6  # block 2 reuses block 1's module: still one map per block


def test_attention_analysis_tidy_rows(tmp_path):
    model = tiny_dit(attention="3,G,G,G,G,G")
    x = images(5)
    df = attention_analysis(model, x, [100, 800], noise_seed=1, batch_size=2, radii=(1, 2))
    metrics = {"mass_r1", "mass_r2", "mean_distance", "entropy"}
    assert set(df.metric) == metrics
    assert set(df["head"]) == {"0", "1", "mean"}
    assert len(df) == 6 * 2 * len(metrics) * 3
    # a 3x3 window on a 4x4 grid slides inward at borders: every key is within Chebyshev distance 2
    local = df[(df.layer == 1) & (df.metric == "mass_r2")]
    assert local["value"].to_numpy() == pytest.approx(1.0)
    # the head mean is the mean of the heads
    sel = df[(df.layer == 2) & (df.t == 800) & (df.metric == "entropy")].set_index("head")["value"]
    assert sel["mean"] == pytest.approx((sel["0"] + sel["1"]) / 2)
    assert (df[df.metric == "entropy"]["value"] <= math.log(L) + 1e-6).all()
    write_parquet(df, tmp_path / "attn.parquet")


def test_plot_attention_maps(tmp_path):
    model = tiny_dit()
    maps = attention_maps(model, images(2), 300)
    fig = plot_attention_maps(maps, GRID, layers=(1, 3, 6), path=tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 0
    main = [ax for ax in fig.axes if ax.get_title().startswith("Layer")]
    assert [ax.get_title() for ax in main] == ["Layer 1", "Layer 3", "Layer 6"]
    im = main[0].images[0]
    assert im.get_clim() == (0.0, 0.1)
    assert im.get_array().shape == (L, L)
    inset = main[0].images[1]  # the centre query's row on the token grid, in the panel's top-right corner
    assert inset.get_array().shape == GRID and inset.get_clim() == (0.0, 0.1)
    left, right, bottom, top = inset.get_extent()
    assert (left, right) == pytest.approx((-0.5 + 0.6 * L, -0.5 + 0.98 * L))
    assert (top, bottom) == pytest.approx((-0.5 + 0.02 * L, -0.5 + 0.4 * L))
    assert main[0].get_xlim() == (-0.5, L - 0.5)  # the inset does not change the panel's extent
    log = plot_attention_maps(maps, GRID, layers=(1,), scale="log")
    assert [ax for ax in log.axes if ax.get_title() == "Layer 1"][0].images[0].get_clim() == (0.0, 1.0)
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------------------------------
# PCA basis (appendix C)
# ---------------------------------------------------------------------------------------------------


def test_pca_basis_shape_rows_and_load():
    model = tiny_dit()
    q = 6
    basis = collect_pca_basis(model, images(4), layers=(1, 2, 3), num_components=q, batch_size=3)
    assert sorted(basis) == [1, 2, 3]
    for comps in basis.values():
        assert comps.shape == (q, L, L) and comps.dtype == torch.float32
        assert comps.sum(-1).abs().max() < 1e-5  # PCs of centred maps: each row sums to 0
        flat = comps.reshape(q, -1)
        torch.testing.assert_close(flat @ flat.T, torch.eye(q), atol=1e-4, rtol=0)

    pca_model = build_model(preset="DiT-T/2", input_size=8, in_channels=1,
                            options={"pca_layers": [1, 2, 3], "pca_components": q}).eval()
    pca_model.load_pca_basis(basis)
    torch.testing.assert_close(pca_model.blocks[1].attn.components, basis[2])
    assert isinstance(pca_model.blocks[0].attn, PCAAttention)
    x = images(2)
    out = pca_model(x, torch.tensor([5, 600]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    # composed maps (coefficients x PCs + 1/L): every row sums to 1
    for m in attention_maps(pca_model, x, 600)[:3]:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, L), atol=1e-5, rtol=0)


def test_pca_out_of_core_matches_in_memory():
    model = tiny_dit()
    kwargs = dict(layers=(2, 5), num_components=4, batch_size=3, steps=(10, 40))
    mem = collect_pca_basis(model, images(5), **kwargs)
    ooc = collect_pca_basis(model, images(5), max_memory_bytes=0, **kwargs)
    for layer in (2, 5):
        a, b = mem[layer].reshape(4, -1), ooc[layer].reshape(4, -1)
        # same subspace (signs and rotations within it are free)
        torch.testing.assert_close(torch.linalg.svdvals(a @ b.T), torch.ones(4), atol=1e-3, rtol=0)


def test_streaming_pca_exact_on_low_rank_data():
    g = torch.Generator().manual_seed(0)
    n, F, r = 90, 40, 5
    A = torch.randn(n, r, generator=g) @ torch.randn(r, F, generator=g) * torch.linspace(3, 1, F) + 2.0

    def passes():
        for s in range(0, n, 25):
            yield {0: A[s : s + 25]}

    out = streaming_pca(passes, 3, niter=1, oversample=4)
    V, S = out[0]
    _, S_ref, Vh = torch.linalg.svd(A - A.mean(0), full_matrices=False)
    torch.testing.assert_close(S, S_ref[:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((V.T @ Vh[:3].T).abs(), torch.eye(3), atol=1e-4, rtol=0)


def test_figs_9_to_11_draw_the_dit_when_the_study_has_no_baseline():
    from types import SimpleNamespace

    from diffbias.analysis import Block
    from diffbias.measurements.attention import figure_variants

    unet = (SimpleNamespace(variant="unet"), {"layer1": None})  # one attention layer (the middle block)
    dit = (SimpleNamespace(variant="xs"), {f"layer{k}": None for k in range(1, 13)})
    no_baseline = {"blocks": [Block("UNet-004", None, ["unet"]), Block("DiT-XS/1", None, ["xs"])]}
    assert figure_variants(no_baseline, [unet, dit]) == {"xs"}
    assert figure_variants(no_baseline, [unet]) == {"unet"}  # nothing deeper: whatever has maps
    assert figure_variants({"blocks": [Block("UNet", "unet", ["unet", "xs"])]}, [unet, dit]) == {"unet"}
