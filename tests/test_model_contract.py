"""One contract for every registered backbone, exercised at its tiny preset(s).

Registering a backbone with a tiny preset is all it takes to be covered here.
"""

import pytest
import torch

from diffbias.diffusion import create_diffusion
from diffbias.models import BACKBONES, PRESETS, build_model
from diffbias.train import diffusion_loss

TINY = sorted(name for name, p in PRESETS.items() if p.tiny)


def test_every_backbone_has_a_tiny_preset():
    covered = {PRESETS[n].backbone for n in TINY}
    assert covered == set(BACKBONES), f"backbones without a tiny preset: {set(BACKBONES) - covered}"


def _build(name, num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_model(preset=name, input_size=16, in_channels=1, num_classes=num_classes)


def _inputs(num_classes=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    t = torch.tensor([3, 800])
    y = torch.tensor([1, num_classes]) if num_classes else None
    return x, t, y


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape_and_determinism(name, num_classes):
    model = _build(name, num_classes).eval()
    x, t, y = _inputs(num_classes)
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y)
    assert a.shape == (2, 2, 16, 16)  # learned sigma: 2C channels
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    other = _build(name, num_classes).eval()
    with torch.no_grad():
        assert torch.equal(other(x, t, y), a)  # same seed, same init


@pytest.mark.parametrize("name", TINY)
def test_zero_output_at_init_where_designed(name):
    """adaLN-Zero designs output exactly 0 at init; the others (U-ViT, DiMR) must declare they do not."""
    model = _build(name)
    x, t, _ = _inputs()
    peak = model(x, t).abs().max().item()
    if getattr(type(model), "zero_output_at_init", False):
        assert peak == 0.0
    else:
        assert peak > 0.0, f"{name} outputs zero at init but does not declare zero_output_at_init"


def _perturb_zero_inits(model):
    """Perturb constant-initialised tensors (zeros, and ones such as DiMR's time-dependent p0 = p1, whose
    sigmoid weights get no gradient while p0 == p1)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
            elif bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p) * 0.02)


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    model = _build(name, num_classes=10)
    _perturb_zero_inits(model)  # zero-initialised layers would block gradients upstream at step 0
    x, t, y = _inputs(10)
    diffusion = create_diffusion(None)
    loss = diffusion_loss(model, diffusion, x, t, torch.randn_like(x), y)["loss"].mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # the label row of the class not in the batch gets no gradient by construction
    missing = [n for n in missing if "embedding_table" not in n]
    assert not missing, f"no gradient: {missing}"


@pytest.mark.parametrize("name", TINY)
def test_a_few_training_steps_lower_the_loss(name):
    model = _build(name)
    diffusion = create_diffusion(None)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_fn():
        return diffusion.training_losses(model, x0, t, noise=noise)["mse"].mean()

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < first


@pytest.mark.parametrize("name", TINY)
def test_counts_are_reported(name):
    from diffbias.metrics.flops import count_flops, count_parameters

    model = _build(name).eval()
    params = count_parameters(model)
    macs, table = count_flops(model, input_size=16, in_channels=1)
    assert params > 0 and macs > 0
    assert table["macs"].sum() == macs
