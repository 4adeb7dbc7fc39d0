"""The cooperative losses: values against a plain-torch restatement, and where each
term's gradient goes (the paper's stop-gradients)."""
import pytest
import torch
import torch.nn.functional as F

import coopseg_kernels as ck
from coopseg.losses import cooperative_loss
from coopseg.models import CooperativeNet, Registor, Segmentor


def _net(dims=2, omega="elastic"):
    torch.manual_seed(0)
    net = CooperativeNet(Segmentor(dims, width=0.125), Registor(dims, omega=omega))
    torch.nn.init.normal_(net.registor.head.weight, std=0.5)  # a non-identity registration
    torch.nn.init.normal_(net.registor.head.bias, std=0.5)
    return net


def _pair(size=(32, 48), seed=1):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g)
    s1 = (torch.rand(1, 1, *size, generator=g) > 0.5).float()
    s2 = (torch.rand(1, 1, *size, generator=g) > 0.6).float()
    return x1, x2, s1, s2


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _nonzero(grads):
    return {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}


def _inside_brute_force(coarse, size):
    """1 where voxel + displacement lies in [0, n - 1] on every axis (the positions themselves)."""
    field = ck.reference.upsample_field(coarse.detach().double(), size)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij")
    ok = torch.ones(field.shape[0], *size, dtype=torch.bool)
    for k, n in enumerate(size):
        p = grids[k] + field[:, k]
        ok &= (p >= -1e-6) & (p <= n - 1 + 1e-6)
    return ok[:, None].float()


@pytest.mark.parametrize("inside_only", [True, False])
def test_values_match_plain_torch_restatement(inside_only):
    net = _net()
    x1, x2, s1, s2 = _pair()
    out = net(x1, x2)
    t = cooperative_loss(out, s1, s2, lambda_r=0.1, lambda_g=1.0, lambda_p=0.7, backend="cpp",
                         inside_only=inside_only)
    l1, l2, coarse = out
    p1, p2 = torch.sigmoid(l1), torch.sigmoid(l2)
    seg = F.binary_cross_entropy(p1, s1) + F.binary_cross_entropy(p2, s2)
    moved = ck.reference.warp(p1, coarse)
    blur = ck.reference.blur
    v = _inside_brute_force(coarse, s1.shape[2:]) if inside_only else torch.ones_like(s1)
    if inside_only:  # the registration reads outside the crop somewhere, else the test would not tell
        assert 0 < v.mean() < 1
    reg = ((blur(v * moved) - blur(v * s2)) ** 2).mean()
    sim = (v * (moved - p2) ** 2).sum() / v.sum()
    torch.testing.assert_close(t.seg, seg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.reg, reg, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.sim, sim, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.total, 0.1 * seg + reg + 0.7 * sim, rtol=1e-5, atol=1e-6)
    assert t.reg > 0 and t.sim > 0
    ref = cooperative_loss(out, s1, s2, lambda_r=0.1, lambda_g=1.0, lambda_p=0.7, backend="reference",
                           inside_only=inside_only)
    for a, b in zip(t, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_registration_loss_trains_the_registor_only():
    net = _net()
    x1, x2, s1, s2 = _pair()
    cooperative_loss(net(x1, x2), s1, s2, lambda_r=0, lambda_g=1, lambda_p=0).total.backward()
    assert not _nonzero(_grads(net.segmentor))  # every segmentor gradient None or zero
    assert "head.weight" in _nonzero(_grads(net.registor))


def test_segmentation_loss_trains_the_segmentor_only():
    net = _net()
    x1, x2, s1, s2 = _pair()
    cooperative_loss(net(x1, x2), s1, s2, lambda_r=1, lambda_g=0, lambda_p=0).total.backward()
    assert not _nonzero(_grads(net.registor))
    assert "out_tr.final_conv.weight" in _nonzero(_grads(net.segmentor))


def _sim_grads(**options):
    """Gradients of L_p w.r.t. the two logits and the registor."""
    net = _net()
    x1, x2, s1, s2 = _pair()
    l1, l2, coarse = net(x1, x2)
    l1.retain_grad(), l2.retain_grad()
    cooperative_loss((l1, l2, coarse), s1, s2, lambda_r=0, lambda_g=0, lambda_p=1, **options).total.backward()
    return l1.grad, l2.grad, _nonzero(_grads(net.registor)), _nonzero(_grads(net.segmentor))


def test_similarity_loss_reaches_only_the_second_channel_by_default():
    g1, g2, reg, seg = _sim_grads()
    assert g1 is None or not g1.abs().sum()   # nothing through ŝ1
    assert g2.abs().sum() > 0                 # the segmentor learns through ŝ2
    assert not reg                            # the registor gets nothing
    assert "out_tr.final_conv.weight" in seg


def test_similarity_ablation_options():
    g1, g2, reg, _ = _sim_grads(sim_to_s1=True)
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0 and not reg
    g1, g2, reg, _ = _sim_grads(sim_to_registor=True)
    assert (g1 is None or not g1.abs().sum()) and "head.weight" in reg
    g1, g2, reg, _ = _sim_grads(sim_to_s1=True, sim_to_registor=True)
    assert g1.abs().sum() > 0 and "head.weight" in reg


def test_registor_gets_no_gradient_through_its_inputs():
    net = _net()
    x1, x2, s1, s2 = _pair()
    x1.requires_grad_(True)
    l1, l2, coarse = net(x1, x2)
    coarse.sum().backward()
    assert x1.grad is None  # the registor's input (the probabilities) was detached
    assert not _nonzero(_grads(net.segmentor))


def test_translation_and_3d():
    net = _net(dims=3, omega="translation")
    x1, x2, s1, s2 = _pair((16, 16, 32))
    t = cooperative_loss(net(x1, x2), s1, s2, lambda_r=1, lambda_g=1, lambda_p=1)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in t)
    t.total.backward()
    assert "head.bias" in _nonzero(_grads(net.registor))


def test_bad_arguments():
    net = _net()
    x1, x2, s1, s2 = _pair()
    out = net(x1, x2)
    with pytest.raises(ValueError, match="lambda_p must be a number >= 0"):
        cooperative_loss(out, s1, s2, lambda_r=1, lambda_g=1, lambda_p=-1)
    with pytest.raises(ValueError, match="s2 must have the shape"):
        cooperative_loss(out, s1, s2[..., :8], lambda_r=1, lambda_g=1, lambda_p=1)
    with pytest.raises(TypeError, match="outputs must be"):
        cooperative_loss(out[:2], s1, s2, lambda_r=1, lambda_g=1, lambda_p=1)


def test_blur_kernel_sigma():
    from coopseg.losses import blur_kernel

    assert blur_kernel(0) == (1.0, 2.0, 1.0)  # the paper's
    k = blur_kernel(2.5)
    assert len(k) == 2 * 8 + 1 and abs(sum(k) - 1) < 1e-12 and max(k) == k[8]
    assert all(abs(a - b) < 1e-15 for a, b in zip(k, reversed(k)))
    assert k[8 + 3] / k[8] == pytest.approx(torch.exp(torch.tensor(-0.5 * (3 / 2.5) ** 2)).item(), rel=1e-6)
    for bad in (-1, float("nan"), float("inf"), 1e308, 1001, True, "2"):
        with pytest.raises(ValueError, match=r"sigma must be a number in \[0, 1000\]"):
            blur_kernel(bad)


@pytest.mark.parametrize("dims", [2, 3])
def test_ones_translated_10_px_give_zero_lp_and_lg_inside_only(dims):
    """Masks of ones everywhere, a translation of 10 px: what the warp reads from outside the
    crop is ignored, so L_p = L_g = 0; the paper's plain means are not 0 there."""
    size = (40, 37) if dims == 2 else (24, 21, 19)
    logits = torch.full((1, 1, *size), 30.0)     # sigmoid = 1
    coarse = torch.zeros(1, dims, *([3] * dims))
    coarse[:, -1] = 10.0                          # 10 px along the last axis
    ones = torch.ones(1, 1, *size)
    kernel = tuple([1.0] * 9)
    t = cooperative_loss((logits, logits, coarse), ones, ones, lambda_r=1.0, lambda_g=1.0, lambda_p=1.0,
                         kernel=kernel)
    assert t.sim.item() == 0.0 and t.reg.item() == 0.0
    plain = cooperative_loss((logits, logits, coarse), ones, ones, lambda_r=1.0, lambda_g=1.0, lambda_p=1.0,
                             kernel=kernel, inside_only=False)
    assert plain.sim.item() > 0.1 and plain.reg.item() > 0.05


def test_inside_mask_matches_positions():
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(2, 2, 4, 5, generator=g) * 6
    from coopseg.losses import inside_mask
    v = inside_mask(coarse, (23, 30), backend="cpp")
    assert torch.equal(v, _inside_brute_force(coarse, (23, 30)))
    with pytest.raises(TypeError, match="inside_only"):
        cooperative_loss((torch.zeros(1, 1, 8, 8),) * 2 + (torch.zeros(1, 2, 1, 1),), torch.zeros(1, 1, 8, 8),
                         torch.zeros(1, 1, 8, 8), lambda_r=1, lambda_g=1, lambda_p=1, inside_only="yes")
