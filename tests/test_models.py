"""The segmentor (Models Genesis UNet3D), the registor, the cooperative pair,
activation checkpointing, and loading a Models Genesis checkpoint."""
import re

import pytest
import torch

from coopseg.models import CooperativeNet, Registor, Segmentor, load_genesis
from coopseg.models.norm import BatchNormNd


def _genesis_keys():
    """The 106 state_dict keys of Models Genesis' UNet3D (its unet3d.py, written out)."""
    convs = {"down_tr64": 2, "down_tr128": 2, "down_tr256": 2, "down_tr512": 2,
             "up_tr256": 2, "up_tr128": 2, "up_tr64": 2}
    keys = []
    for block, n in convs.items():
        if block.startswith("up"):
            keys += [f"{block}.up_conv.weight", f"{block}.up_conv.bias"]
        for i in range(n):
            keys += [f"{block}.ops.{i}.conv1.weight", f"{block}.ops.{i}.conv1.bias"]
            keys += [f"{block}.ops.{i}.bn1.{k}" for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    return keys + ["out_tr.final_conv.weight", "out_tr.final_conv.bias"]


GENESIS_SHAPES = {  # conv weights of the published model (in, out as in its unet3d.py)
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3), "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
    "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3), "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
    "up_tr256.up_conv.weight": (512, 512, 2, 2, 2), "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
    "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3), "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
    "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
}


def test_genesis_key_names_and_shapes():
    sd = Segmentor(spatial_dims=3).state_dict()
    assert len(sd) == 106
    assert set(sd) == set(_genesis_keys())
    for k, shape in GENESIS_SHAPES.items():
        want = (shape[0], 2, *shape[2:]) if k == "down_tr64.ops.0.conv1.weight" else shape
        want = (2, *shape[1:]) if k.startswith("out_tr") else want
        assert tuple(sd[k].shape) == want, k


@pytest.mark.parametrize("dims,size", [(2, (16, 40)), (3, (8, 16, 24))])
@pytest.mark.parametrize("norm", ["cont_bn", "batch", "instance"])
def test_segmentor_shapes(dims, size, norm):
    net = Segmentor(spatial_dims=dims, width=0.125, norm=norm)
    y = net(torch.rand(2, 2, *size))
    assert y.shape == (2, 2, *size)
    assert torch.isfinite(y).all()


def test_width_scales_channels():
    small = Segmentor(spatial_dims=2, width=0.25)
    assert small.down_tr64.ops[0].conv1.out_channels == 8
    assert small.up_tr64.ops[0].conv1.in_channels == 16 + 32  # up_conv(32) + skip(16)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in Segmentor(2, width=0.5).parameters())


def test_segmentor_size_errors():
    net = Segmentor(spatial_dims=3, width=0.125)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.rand(1, 2, 8, 12, 16))
    with pytest.raises(ValueError, match="C=2"):
        net(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="norm must be one of"):
        Segmentor(norm="group")
    with pytest.raises(ValueError, match="spatial_dims"):
        Segmentor(spatial_dims=1)
    with pytest.raises(ValueError, match="too small for cont_bn"):  # one value a channel at 1/8
        net.eval()(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="too small for instance"):
        Segmentor(2, width=0.125, norm="instance")(torch.rand(2, 2, 8, 8))
    Segmentor(2, width=0.125, norm="batch").eval()(torch.rand(1, 2, 8, 8))  # running statistics: fine
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.ones(1, 2, 16, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="must match the parameters"):
        net(torch.rand(1, 2, 16, 16, 16, dtype=torch.float64))
    for kw, match in [(dict(width=True), "width"), (dict(width=float("inf")), "width"), (dict(in_channels=True),
                      "in_channels"), (dict(spatial_dims=True), "spatial_dims")]:
        with pytest.raises(ValueError, match=match):
            Segmentor(**kw)
    with pytest.raises(TypeError, match="checkpointing"):
        Segmentor(2, width=0.125, checkpointing="no")


def test_registor_argument_and_input_errors():
    for kw, match in [(dict(in_channels=0), "in_channels"), (dict(in_channels=-1), "in_channels"),
                      (dict(channels=()), "channels"), (dict(spatial_dims=2.0), "spatial_dims"),
                      (dict(scale=float("nan")), "scale"),
                      (dict(omega="elastic", pool="mask"), "applies to omega='translation' only")]:
        with pytest.raises(ValueError, match=match):
            Registor(**{"spatial_dims": 2, "omega": "translation", **kw})
    with pytest.raises(TypeError, match="checkpointing"):
        Registor(2, checkpointing="yes")
    reg = Registor(2, omega="translation", pool="mask")
    with pytest.raises(TypeError, match="floating-point"):
        reg(torch.ones(1, 2, 32, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="must match the parameters"):
        reg(torch.rand(1, 2, 32, 32, dtype=torch.float64))


def test_cont_bn_uses_batch_statistics_in_eval_and_batch_does_not():
    x = torch.randn(2, 3, 4, 5) * 4 + 2
    cont, plain = BatchNormNd(3, 2, continuous=True), BatchNormNd(3, 2, continuous=False)
    cont.train(), plain.train()
    cont(x), plain(x)  # one update of the running statistics
    cont.eval(), plain.eval()
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(cont(x), ref)
    assert not torch.allclose(plain(x), ref, atol=1e-3)
    before = cont.running_mean.clone()
    cont(x)  # eval: no update
    assert torch.equal(before, cont.running_mean)


def test_batchnorm_matches_torch():
    x = torch.randn(2, 4, 3, 5, 6) * 3 + 1
    ours, ref = BatchNormNd(4, 3, continuous=False), torch.nn.BatchNorm3d(4)
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("dims,omega,size,coarse", [
    (3, "elastic", (16, 32, 48), (1, 2, 3)), (2, "elastic", (32, 64), (2, 4)),
    (2, "translation", (32, 48), (1, 1)), (3, "translation", (16, 16, 32), (1, 1, 1))])
def test_registor_shapes_and_identity_start(dims, omega, size, coarse):
    reg = Registor(spatial_dims=dims, omega=omega)
    out = reg(torch.rand(2, 2, *size))
    assert out.shape == (2, dims, *coarse)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised last layer = identity
    with pytest.raises(ValueError, match="multiples of 16"):
        reg(torch.rand(1, 2, *[s + 8 for s in size]))


@pytest.mark.parametrize("dims,size", [(2, (32, 48)), (3, (16, 48, 16))])
def test_registor_mask_pool_is_the_mask_weighted_mean_of_the_location_shifts(dims, size):
    """pool="mask": sum_l w_l u_l / sum_l w_l with w_l the input mass under coarse cell l
    (checked by hand on random, non-zero head weights and a mask that leaves cells empty)."""
    torch.manual_seed(0)
    reg = Registor(spatial_dims=dims, omega="translation", pool="mask", scale=2.0)
    torch.nn.init.normal_(reg.head.weight)
    torch.nn.init.normal_(reg.head.bias)
    p = torch.zeros(2, 2, *size)
    p[(slice(None), slice(None), *[slice(0, n // 2 + 3) for n in size])] = torch.rand(2, 2, *[n // 2 + 3 for n in size])
    x = p
    for block in reg.blocks:
        x = block(x)
    u = (reg.head(x) * 2.0).flatten(2)                                     # (B, nd, cells)
    pool = torch.nn.functional.avg_pool3d if dims == 3 else torch.nn.functional.avg_pool2d
    w = pool(p.sum(1, keepdim=True), 16).flatten(2) + 1e-6                 # (B, 1, cells)
    assert (w < 1e-5).any() and (w > 1e-2).any()                          # some cells see no mask
    expected = ((u * w).sum(-1) / w.sum(-1)).view(2, dims, *[1] * dims)
    torch.testing.assert_close(reg(p), expected)
    assert not torch.allclose(reg(p), _mean_pool(reg, p), atol=1e-3, rtol=0)  # the empty cells no longer count
    with pytest.raises(ValueError, match="pool must be one of mean, mask, got 'max'"):
        Registor(spatial_dims=dims, omega="translation", pool="max")


def _mean_pool(reg, p):
    """The same registor's output with the spec's global average."""
    reg.pool = "mean"
    try:
        return reg(p)
    finally:
        reg.pool = "mask"


def test_cooperative_net_shapes_and_detached_registor_input():
    torch.manual_seed(0)
    net = CooperativeNet(Segmentor(2, width=0.125), Registor(2))
    torch.nn.init.normal_(net.registor.head.weight)
    x1, x2 = torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48)
    l1, l2, coarse = net(x1, x2)
    assert l1.shape == l2.shape == (1, 1, 32, 48) and coarse.shape == (1, 2, 2, 3)
    coarse.square().sum().backward()  # anything computed from the registor output...
    assert all(p.grad is None for p in net.segmentor.parameters())  # ...never reaches the segmentor
    assert net.registor.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share one grid"):
        net(x1, torch.rand(1, 1, 32, 32))


def _run_step(net, x1, x2, s1, s2):
    from coopseg.losses import cooperative_loss
    net.zero_grad(set_to_none=True)
    terms = cooperative_loss(net(x1, x2), s1, s2, lambda_r=1.0, lambda_g=1.0, lambda_p=1.0)
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return terms.total.detach(), grads


@pytest.mark.parametrize("norm", ["cont_bn", "batch"])
def test_checkpointing_same_loss_gradients_and_running_statistics(norm):
    torch.manual_seed(0)
    net = CooperativeNet(Segmentor(2, width=0.125, norm=norm), Registor(2))
    torch.nn.init.normal_(net.registor.head.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(1, 1, 32, 48, generator=g), torch.rand(1, 1, 32, 48, generator=g)
    s1, s2 = (x1 > 0.5).float(), (x2 > 0.4).float()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    loss_plain, grads_plain = _run_step(net, x1, x2, s1, s2)
    stats_plain = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    net.load_state_dict(state)
    net.checkpointing = True
    loss_ckpt, grads_ckpt = _run_step(net, x1, x2, s1, s2)
    stats_ckpt = {k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) > 0
    for k in grads_plain:
        torch.testing.assert_close(grads_ckpt[k], grads_plain[k], rtol=1e-5, atol=1e-7)
    assert all(int(v) == 1 for k, v in stats_ckpt.items() if "num_batches" in k)  # one update, not two
    for k in stats_plain:
        torch.testing.assert_close(stats_ckpt[k], stats_plain[k], rtol=0, atol=0)
    moved = [k for k in stats_plain if "running_mean" in k and not torch.equal(stats_plain[k], state[k])]
    assert moved  # the statistics did change (the test compares something)


def test_load_genesis_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "Genesis_Chest_CT.pt"
    ref = Segmentor(3).state_dict()
    sd = {k: (torch.tensor(100) if k.endswith("num_batches_tracked") else torch.randn(v.shape, generator=g))
          for k, v in ref.items()}
    sd["down_tr64.ops.0.conv1.weight"] = torch.randn(32, 1, 3, 3, 3, generator=g)
    sd["out_tr.final_conv.weight"] = torch.randn(1, 64, 1, 1, 1, generator=g)
    sd["out_tr.final_conv.bias"] = torch.randn(1, generator=g)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)

    seg = Segmentor(3)
    report = load_genesis(seg, path)
    assert len(report["loaded"]) == 103
    assert report["adapted"] == ["down_tr64.ops.0.conv1.weight"]
    assert sorted(report["skipped"]) == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    got = seg.state_dict()
    for k in report["loaded"]:
        assert torch.equal(got[k], sd[k]), k
    w = got["down_tr64.ops.0.conv1.weight"]
    torch.testing.assert_close(w[:, 0:1], sd["down_tr64.ops.0.conv1.weight"] / 2)
    torch.testing.assert_close(w[:, 1:2], sd["down_tr64.ops.0.conv1.weight"] / 2)
    assert got["out_tr.final_conv.weight"].shape == (2, 64, 1, 1, 1)
    # Adapted first conv: two identical images give the pretrained 1-channel response.
    x = torch.randn(1, 1, 5, 6, 7, generator=g)
    one = torch.nn.functional.conv3d(x, sd["down_tr64.ops.0.conv1.weight"], sd["down_tr64.ops.0.conv1.bias"], padding=1)
    two = seg.down_tr64.ops[0].conv1(torch.cat((x, x), 1))
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)


def test_load_genesis_reports_mismatches_and_errors(tmp_path):
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "g.pt"
    sd = {k: torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v
          for k, v in Segmentor(3).state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    report = load_genesis(Segmentor(3, norm="instance"), path)
    assert "down_tr64.ops.0.bn1.running_mean" in report["skipped"]
    assert "down_tr64.ops.0.bn1.weight" in report["loaded"]
    with pytest.raises(ValueError, match="spatial_dims=3"):
        load_genesis(Segmentor(2), path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_genesis(Segmentor(3), tmp_path / "missing.pt")
    torch.save({"state_dict": {"module.other.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no key matches"):
        load_genesis(Segmentor(3), tmp_path / "other.pt")


def _lean_layer(norm, cin, dtype=torch.float64, out=4):
    from coopseg.models.segmentor import LUConv
    layer = LUConv(cin, out, 3, norm).to(dtype).train()
    with torch.no_grad():  # non-trivial affine parameters, some γ negative
        layer.bn1.weight.normal_()
        layer.bn1.bias.normal_()
    return layer


def test_up_level_split_conv_equals_conv_of_concatenation():
    """ops[0](up, skip) = relu(norm(conv(cat(up, skip)))) with the same conv1 weight."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    layer = _lean_layer("cont_bn", 5)
    up, skip = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64), torch.randn(2, 2, 4, 5, 3, dtype=torch.float64)
    ref = F.relu(F.batch_norm(F.conv3d(torch.cat((up, skip), 1), layer.conv1.weight, layer.conv1.bias, padding=1),
                              None, None, layer.bn1.weight, layer.bn1.bias, True, 0.0, layer.bn1.eps))
    torch.testing.assert_close(layer(up, skip), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="input channels"):
        layer(up, skip[:, :1])


@pytest.mark.parametrize("norm,n_inputs", [("cont_bn", 2), ("batch", 1), ("instance", 2)])
def test_lean_layer_gradcheck_and_same_as_dense(norm, n_inputs):
    """The lean conv+norm+ReLU (inputs stored, layer recomputed in the backward):
    fp64 gradcheck, and output, gradients and running statistics equal to the dense
    path in fp32, with the running statistics updated once."""
    torch.manual_seed(1)
    layer = _lean_layer(norm, 2 * n_inputs, out=2)
    layer.lean = True
    xs = [torch.randn(1, 2, 2, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(n_inputs)]
    assert torch.autograd.gradcheck(lambda *a: layer(*a), xs)

    layer = _lean_layer(norm, 3 * n_inputs, torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    xs = [torch.randn(1, 3, 6, 5, 7, requires_grad=True) for _ in range(n_inputs)]
    results = []
    for lean in (False, True):
        layer.load_state_dict(state)
        layer.lean = lean
        y = layer(*xs)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    xs + list(layer.parameters()))
        results.append((y.detach(), grads, {k: v.clone() for k, v in layer.state_dict().items()}))
    (y0, g0, s0), (y1, g1, s1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0)
    if norm != "instance":
        assert int(s1["bn1.num_batches_tracked"]) == 1 and not torch.equal(s1["bn1.running_mean"],
                                                                          state["bn1.running_mean"])


def test_lean_layer_same_as_dense_under_bf16_autocast():
    torch.manual_seed(2)
    layer = _lean_layer("cont_bn", 6, torch.float32)
    xs = [torch.randn(1, 3, 6, 5, 7).bfloat16().requires_grad_() for _ in range(2)]
    results = []
    for lean in (False, True):
        layer.lean = lean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(*xs)
        results.append((y.detach(), torch.autograd.grad(y.float().square().sum(), xs + list(layer.parameters()))))
    (y0, g0), (y1, g1) = results
    assert y1.dtype == y0.dtype
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpointing_switches_the_lean_layers():
    seg = Segmentor(3, width=0.125)
    lus = [m for m in seg.modules() if hasattr(m, "lean")]
    assert len(lus) == 14 and not any(m.lean for m in lus)
    seg.checkpointing = True
    assert all(m.lean for m in lus)


def _up_layer(norm, dtype, cin_low=3, cskip=2, out=3, dims=3):
    """An up level's first layer: ConvTranspose (k2 s2) of the low-resolution input,
    then conv(cat(upsampled, skip)) + norm + ReLU (the up tensor has cin_low channels)."""
    from coopseg.models.segmentor import LUConv
    layer = LUConv(cin_low + cskip, out, dims, norm).to(dtype).train()
    convT = torch.nn.ConvTranspose3d if dims == 3 else torch.nn.ConvTranspose2d
    up = convT(cin_low, cin_low, kernel_size=2, stride=2).to(dtype)
    with torch.no_grad():
        layer.bn1.weight.normal_()
        layer.bn1.bias.normal_()
    return layer, up


def _grads_of(layer, up, xs, run):
    params = list(layer.parameters()) + list(up.parameters())
    y = run()
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view_as(y)
    return y.detach(), torch.autograd.grad((y.float() * w).sum(), xs + params)


@pytest.mark.parametrize("norm,dims,train", [("cont_bn", 3, True), ("batch", 2, True), ("batch", 3, False),
                                             ("instance", 3, True)])
def test_lean_up_layer_gradcheck_and_same_as_dense(norm, dims, train):
    """ops[0] of an up level with the transposed conv folded in (lean: stores the
    low-resolution input and the skip): fp64 gradcheck, and output, every gradient
    (inputs, conv, norm and up-conv parameters) and the running statistics equal to
    the dense path in fp32 -- written-out backward (batch statistics) and the
    autograd one (eval BatchNorm, InstanceNorm)."""
    torch.manual_seed(4)
    layer, up = _up_layer(norm, torch.float64, cin_low=2, cskip=1, out=2, dims=dims)
    layer.train(train)
    layer.lean = True
    low = (1, 2, 1) if dims == 3 else (2, 1)
    xs = [torch.randn(1, 2, *low, dtype=torch.float64, requires_grad=True),
          torch.randn(1, 1, *[2 * n for n in low], dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, up=up), xs)

    layer, up = _up_layer(norm, torch.float32, dims=dims)
    layer.train(train)
    if not train:
        with torch.no_grad():
            layer.bn1.running_mean.normal_()
            layer.bn1.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    low, sk = (3, 2, 4) if dims == 3 else (3, 5), (6, 4, 8) if dims == 3 else (6, 10)
    xs = [torch.randn(1, 3, *low, requires_grad=True), torch.randn(1, 2, *sk, requires_grad=True)]
    results = []
    for lean in (False, True):
        layer.load_state_dict(state)
        layer.lean = lean
        y, g = _grads_of(layer, up, xs, lambda: layer(*xs, up=up))
        results.append((y, g, {k: v.clone() for k, v in layer.state_dict().items()}))
    (y0, g0, s0), (y1, g1, s1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    assert len(g0) == 2 + 4 + 2 and all(g is not None for g in g1)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0)


def test_lean_up_layer_same_as_dense_under_bf16_autocast():
    """Under bf16 autocast the written-out backward calls the kernels autograd calls
    on the same tensors: the same output and bit-identical gradients."""
    torch.manual_seed(5)
    layer, up = _up_layer("cont_bn", torch.float32)
    xs = [torch.randn(1, 3, 3, 2, 4).bfloat16().requires_grad_(),
          torch.randn(1, 2, 6, 4, 8).bfloat16().requires_grad_()]
    results = []
    for lean in (False, True):
        layer.lean = lean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_grads_of(layer, up, xs, lambda: layer(*xs, up=up)))
    (y0, g0), (y1, g1) = results
    assert y1.dtype == y0.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lean_layer_with_head_same_as_dense(dtype):
    """The last layer with the output conv folded in (lean: its output is not stored,
    only the logits leave it): fp64 gradcheck; fp32 and bf16 autocast equal to the
    dense path (bf16: bit-identical)."""
    from coopseg.models.segmentor import LUConv
    torch.manual_seed(6)
    layer = LUConv(3, 4, 3, "cont_bn").train()
    head = torch.nn.Conv3d(4, 2, kernel_size=1)
    with torch.no_grad():
        layer.bn1.weight.normal_()
        layer.bn1.bias.normal_()
    if dtype == torch.float64:
        layer, head = layer.double(), head.double()
        layer.lean = True
        x = torch.randn(1, 3, 2, 3, 2, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: layer(a, head=head), [x])
        return
    x = torch.randn(1, 3, 4, 6, 5, requires_grad=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    results = []
    for lean in (False, True):
        layer.lean = lean
        with amp:
            y = layer(x, head=head)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        results.append((y.detach(), torch.autograd.grad((y.float() * w).sum(),
                                                        [x, *layer.parameters(), *head.parameters()])))
    (y0, g0), (y1, g1) = results
    assert y0.dtype == y1.dtype
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dims", [2, 3])
def test_lean_registor_block_same_as_plain(dims):
    """A registor block storing only its input (checkpointing on): fp64 gradcheck
    (input and parameters through the block), and fp32 / bf16 autocast gradients
    equal to the plain block (bf16: bit-identical)."""
    from coopseg.models.lean import lean_conv_relu_pool
    from coopseg.models.registor import RegistorBlock
    torch.manual_seed(7)
    block = RegistorBlock(2, 3, dims).double()
    shape = (1, 2, 4, 2, 4) if dims == 3 else (1, 2, 4, 6)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lean_conv_relu_pool(block, a), [x])
    block = block.float()
    x = torch.randn(*[2 * n if i > 1 else n for i, n in enumerate(shape)], requires_grad=True)
    for bf16 in (False, True):
        results = []
        for lean in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = lean_conv_relu_pool(block, x) if lean else block(x)
            w = torch.linspace(-1, 1, y.numel()).view_as(y)
            results.append((y.detach(), torch.autograd.grad((y.float() * w).sum(), [x, *block.parameters()])))
        (y0, g0), (y1, g1) = results
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        tol = dict(rtol=0, atol=0) if bf16 else dict(rtol=1e-5, atol=1e-6)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, **tol)


def test_checkpointing_3d_bf16_autocast_same_as_plain():
    from coopseg.losses import cooperative_loss
    """The whole pair in 3-D under bf16 autocast (the memory benchmark's `all`):
    checkpointing with the lean layers gives the plain path's loss and gradients
    bit for bit, and the running statistics once."""
    torch.manual_seed(8)
    net = CooperativeNet(Segmentor(3, width=0.125), Registor(3))
    torch.nn.init.normal_(net.registor.head.weight, std=0.1)
    g = torch.Generator().manual_seed(2)
    # 32^3: at the coarsest levels of smaller crops (a few voxels) oneDNN's bf16 weight
    # gradients differ from run to run already on the plain path.
    x1, x2 = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 1, 32, 32, 32, generator=g)
    s1, s2 = (x1 > 0.5).float(), (x2 > 0.4).float()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = []
    for ckpt in (False, True):
        net.load_state_dict(state)
        net.zero_grad(set_to_none=True)
        net.checkpointing = ckpt
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = net(x1, x2)
        terms = cooperative_loss(outputs, s1, s2, lambda_r=0.1, lambda_g=1.0, lambda_p=1.0)
        terms.total.backward()
        results.append((terms.total.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                                               if p.grad is not None},
                        {k: v.clone() for k, v in net.state_dict().items() if "running" in k}))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(net.parameters()))
    bad = {k: float((g1[k] - g0[k]).abs().max() / g0[k].abs().max()) for k in g0 if not torch.equal(g1[k], g0[k])}
    assert not bad, bad
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0)


def test_toy_unet_any_size_and_options():
    from coopseg.models import ToyUNet

    torch.manual_seed(0)
    for kw in (dict(levels=3), dict(levels=4, context="dilated"), dict(levels=2, coords=True, norm="instance"),
               dict(levels=3, context="attention")):
        net = ToyUNet(width=0.125, **kw)
        x = torch.rand(2, 2, 37, 50, requires_grad=True)
        y = net(x)
        assert y.shape == (2, 2, 37, 50)
        y.sum().backward()
        assert x.grad.abs().sum() > 0
    # the deeper net sees farther: pixels 40+ px away reach the output with 5 levels, not with 1
    for levels, reaches in ((1, False), (5, True)):
        torch.manual_seed(1)
        net = ToyUNet(width=0.125, levels=levels, norm="batch").eval()
        x = torch.rand(1, 2, 96, 96, requires_grad=True)
        net(x)[..., 48, 44].sum().backward()
        assert bool(x.grad[..., 84:].abs().sum() > 0) is reaches


@pytest.mark.parametrize("kw, message", [
    (dict(levels=0), "levels must be an int in [1, 7]"),
    (dict(levels=True), "levels must be an int"),
    (dict(width=0), "width must be a number in (0, 16]"),
    (dict(norm="group"), "norm must be one of"),
    (dict(context="transformer"), "context must be one of none, dilated, attention"),
])
def test_toy_unet_bad_arguments(kw, message):
    from coopseg.models import ToyUNet

    with pytest.raises(ValueError, match=re.escape(message)):
        ToyUNet(**kw)


def test_toy_unet_bad_inputs():
    from coopseg.models import ToyUNet

    net = ToyUNet(width=0.125, levels=5)
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\) with C=2"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small for cont_bn normalisation at the innermost level"):
        net(torch.rand(1, 2, 32, 32))
    with pytest.raises(TypeError, match="coords must be True or False"):
        ToyUNet(coords=1)
