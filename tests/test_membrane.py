"""Membrane layers: the paper's size on SD 1.5, exact routing, composition, merge and detach."""

import torch
from torch import nn

from spm_train import MembraneBank, MembraneLayer, membrane_targets
from spm_train.membrane import Router
from spm_train.architectures import full_unet


def _unet_out(unet, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ehs = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500] * batch), encoder_hidden_states=ehs).sample


def _randomise_up(bank, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)


def test_sd15_membrane_has_192_layers_and_423936_parameters():
    unet = full_unet("sd15", device="meta")
    bank = MembraneBank.attach(unet, rank=1, alpha=1.0)
    assert bank.num_layers == 192
    assert bank.num_parameters() == 423_936
    assert bank.num_parameters() * 4 / 1e6 == 1.695744  # 1.7 MB in fp32
    kinds = {type(layer.base_layer) for layer in bank.layers.values()}
    assert kinds == {nn.Linear, nn.Conv2d}  # SD 1.5's proj_in/proj_out are 1x1 convolutions
    assert sum(isinstance(l.base_layer, nn.Conv2d) for l in bank.layers.values()) == 32


def test_rank_scales_parameter_count_and_scope_narrows_layers():
    unet = full_unet("sd15", device="meta")
    assert MembraneBank.attach(unet, rank=4).num_parameters() == 4 * 423_936
    unet = full_unet("sd15", device="meta")
    assert len(membrane_targets(unet, "cross_attention")) == 16 * 4
    assert len(membrane_targets(unet, "attention")) == 16 * 8


def test_fresh_membrane_is_kaiming_down_zero_up_and_changes_nothing(fresh_sd1):
    unet = fresh_sd1.unet
    before = _unet_out(unet)
    bank = MembraneBank.attach(unet)
    for layer in bank.layers.values():
        bound = 1 / layer.fan_in ** 0.5
        assert layer.down.abs().max() <= bound and layer.down.abs().max() > 0.5 * bound
        assert torch.count_nonzero(layer.up) == 0
    bank.set_permeability(torch.ones(1, 1))
    assert torch.equal(_unet_out(unet), before)


def test_detach_restores_the_original_modules(fresh_sd1):
    unet = fresh_sd1.unet
    originals = dict(membrane_targets(unet))
    before = _unet_out(unet)
    bank = MembraneBank.attach(unet, count=2)
    _randomise_up(bank)
    bank.set_permeability(torch.ones(1, 2))
    assert not torch.allclose(_unet_out(unet), before)
    bank.detach()
    assert not any(isinstance(m, MembraneLayer) for m in unet.modules())
    restored = membrane_targets(unet)
    assert all(restored[p] is originals[p] for p in originals)
    assert torch.equal(_unet_out(unet), before)


def test_per_sample_routing_equals_running_each_sample_alone(fresh_sd1):
    unet = fresh_sd1.unet
    bank = MembraneBank.attach(unet, count=3)
    _randomise_up(bank)
    owners = torch.tensor([2, -1, 0, 1])
    bank.route(owners)
    batched = _unet_out(unet, batch=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    ehs = torch.randn(4, 16, unet.config.cross_attention_dim, generator=g)
    for b, owner in enumerate(owners.tolist()):
        bank.route(torch.tensor([owner]))
        with torch.no_grad():
            alone = unet(x[b:b + 1], torch.tensor([500]), encoder_hidden_states=ehs[b:b + 1]).sample
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_several_membranes_compose_exactly_not_by_summed_weights(fresh_sd1):
    """sum_i g_i s_i U_i D_i, not (sum g_i U_i)(sum g_i D_i), which adds cross terms U_i D_j."""
    unet = fresh_sd1.unet
    bank = MembraneBank.attach(unet, count=2, alpha=2.0, rank=2)
    _randomise_up(bank)
    gamma = torch.tensor([0.7, 0.4])
    layer = next(iter(bank.layers.values()))
    x = torch.randn(3, layer.base_layer.in_channels if layer.is_conv else layer.base_layer.in_features)
    if layer.is_conv:
        x = x[:, :, None, None]
    bank.set_permeability(gamma)
    got = layer(x)
    expected = layer.base_layer(x)
    summed_d, summed_u = 0, 0
    for i in range(2):
        s = bank._slots(i)
        d, u = layer.down[s].flatten(1), layer.up[:, s].flatten(1)
        scale = bank.specs[i].scale
        expected = expected + (gamma[i] * scale * (x.flatten(1) @ d.T @ u.T)).view_as(expected)
        summed_d, summed_u = summed_d + gamma[i] * d, summed_u + gamma[i] * u
    naive = layer.base_layer(x) + (scale * (x.flatten(1) @ summed_d.T @ summed_u.T)).view_as(expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (naive - expected).abs().max() > 1e-3


def test_merge_matches_routing_and_unmerge_is_bit_exact(fresh_sd1):
    unet = fresh_sd1.unet
    bank = MembraneBank.attach(unet, count=2)
    _randomise_up(bank)
    weights = {p: l.base_layer.weight.detach().clone() for p, l in bank.layers.items()}
    gamma = torch.tensor([1.0, 0.5])
    bank.set_permeability(gamma)
    routed = _unet_out(unet)
    merged = bank.merge(gamma)
    torch.testing.assert_close(_unet_out(unet), routed, rtol=1e-4, atol=1e-5)
    merged.unmerge()
    assert all(torch.equal(l.base_layer.weight, weights[p]) for p, l in bank.layers.items())


def test_merged_membranes_are_not_applied_twice_and_detach_restores_the_base(fresh_sd1):
    unet = fresh_sd1.unet
    originals = {k: v.clone() for k, v in unet.state_dict().items()}
    base = _unet_out(unet)
    bank = MembraneBank.attach(unet, count=1)
    _randomise_up(bank)
    bank.set_permeability(torch.tensor([1.0]))
    routed = _unet_out(unet)
    merged = bank.merge([1.0])
    bank.set_permeability(torch.tensor([1.0]))  # as a transport hook would at every call
    torch.testing.assert_close(_unet_out(unet), routed, rtol=1e-4, atol=1e-5)
    try:
        bank.merge([1.0])
    except RuntimeError as exc:
        assert "merged already" in str(exc)
    else:
        raise AssertionError("merging twice must be refused")
    merged.unmerge()
    torch.testing.assert_close(_unet_out(unet), routed)  # routing is back after unmerge
    bank.merge([0.5])
    bank.detach()  # unmerges first
    assert all(torch.equal(v, originals[k]) for k, v in unet.state_dict().items())
    assert torch.equal(_unet_out(unet), base)


def test_permeability_batch_mismatch_is_reported(fresh_sd1):
    bank = MembraneBank.attach(fresh_sd1.unet, count=1)
    bank.set_permeability(torch.ones(3, 1))
    try:
        _unet_out(fresh_sd1.unet, batch=2)
    except RuntimeError as exc:
        assert "batch of 3" in str(exc) and "batch of 2" in str(exc)
    else:
        raise AssertionError("a permeability for 3 samples was applied to 2")


def test_attaching_twice_is_refused(fresh_sd1):
    MembraneBank.attach(fresh_sd1.unet)
    try:
        MembraneBank.attach(fresh_sd1.unet)
    except ValueError as exc:
        assert "already carries membranes" in str(exc)
    else:
        raise AssertionError("second attach succeeded")


def _routing_outputs_and_grads(unet, bank, route, owners):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(owners), 4, 8, 8, generator=g, dtype=torch.float64)
    ehs = torch.randn(len(owners), 16, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    route(owners)
    out = unet(x, torch.tensor([500] * len(owners)), encoder_hidden_states=ehs).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in bank.parameters()]
    for p in bank.parameters():
        p.grad = None
    return out.detach(), grads


def test_routing_gathers_one_branch_per_sample_and_matches_the_dense_mixture(fresh_sd1):
    """Packs route each sample through its own membrane's rows (rank 2 here, three membranes, one
    sample with none); outputs and every membrane's gradient equal the dense one-hot permeability."""
    unet = fresh_sd1.unet.double()
    bank = MembraneBank.attach(unet, count=3, rank=2, alpha=3.0, dtype=torch.float64)
    _randomise_up(bank)
    for p in bank.parameters():
        p.requires_grad_(True)
    owners = torch.tensor([2, -1, 0, 2, 1])
    routed, routed_grads = _routing_outputs_and_grads(unet, bank, bank.route, owners)
    assert bank.router.owners is not None  # the gathering mode was used
    one_hot = (owners.unsqueeze(1) == torch.arange(3)).float()
    dense, dense_grads = _routing_outputs_and_grads(unet, bank, lambda o: bank.set_permeability(one_hot), owners)
    torch.testing.assert_close(routed, dense, rtol=1e-10, atol=1e-10)
    for a, b in zip(routed_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(gr.abs().sum() > 0 for gr in routed_grads)
    # one row routes every sample of the batch, as one row of permeabilities does
    one_row, _ = _routing_outputs_and_grads(unet, bank, lambda o: bank.route(torch.tensor([1])), owners)
    dense_row, _ = _routing_outputs_and_grads(unet, bank, lambda o: bank.set_permeability(torch.tensor([0., 1, 0])),
                                              owners)
    torch.testing.assert_close(one_row, dense_row, rtol=1e-10, atol=1e-10)


def test_routing_falls_back_to_the_dense_branch_on_wider_convolutions_and_mixed_ranks():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    router = Router(torch.tensor([0, 1, 1]), torch.tensor([1.0, 0.5, 0.5]))  # ranks 1 and 2
    assert router.uniform_rank is None
    layer = MembraneLayer(conv, router, num_slots=3)
    assert not layer.gathers
    with torch.no_grad():
        layer.down.normal_()
        layer.up.normal_()
    x = torch.randn(2, 4, 5, 5)
    router.route(torch.tensor([1, -1]))
    assert router.owners is None and router.weights is not None  # mixed ranks: one-hot permeabilities
    got = layer(x)
    d, u = layer.down[1:], layer.up[:, 1:]
    expected = conv(x[:1]) + 0.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x[:1], d, padding=1), u)
    torch.testing.assert_close(got[:1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], conv(x[1:]))
    uniform = Router(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    wide = MembraneLayer(conv, uniform, num_slots=2)
    with torch.no_grad():
        wide.down.copy_(layer.down[:2])
        wide.up.copy_(layer.up[:, :2])
    uniform.route(torch.tensor([1, 0]))
    assert uniform.owners is not None and not wide.gathers  # 3x3: the dense branch from the one-hot rows
    expected = torch.cat([conv(x[i:i + 1]) + torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x[i:i + 1], wide.down[o:o + 1], padding=1), wide.up[:, o:o + 1])
        for i, o in enumerate([1, 0])])
    torch.testing.assert_close(wide(x), expected, rtol=1e-5, atol=1e-5)
