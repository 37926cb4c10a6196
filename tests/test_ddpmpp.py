"""harness.core.nets.ddpmpp: EDM's DDPM++ (SongUNet) by name, shape, count and output.

The reference numbers below were measured once with NVIDIA's own code (NVlabs/edm,
``training/networks.py``, fetched to a scratch folder outside this repository; it is CC BY-NC-SA
and not part of the project), building ``EDMPrecond(img_resolution=32, img_channels=3,
label_dim=L, model_type='SongUNet', embedding_type='positional', encoder_type='standard',
decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
channel_mult=[2, 2, 2], augment_dim=A, dropout=0.13)`` (``train.py --arch=ddpmpp``; A = 9 when
``--augment`` > 0, its default) and counting ``sum(p.numel() for p in net.parameters())``; the
digest is sha256 over ``f"{name}:{list(shape)}\\n"`` for its ``state_dict()`` with ``model.``
stripped, in order. Full parity (float64, max |difference| 5e-14 to 7e-14 at sigma 0.002, 0.5,
2.5, 80, conditional and not) was shown against their code directly; ``GOLDEN`` keeps a few of
their float64 outputs for a small network so that a regression shows here without their code.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from harness.core import nets
from harness.declare.config import GROUPS
from harness.core.diffusion import Denoiser
from harness.core.inits import init_aux
from harness.core.nets.ddpmpp import CIFAR10, DDPMpp

# (label_dim, augment_dim) -> (parameters, state-dict tensors, names+shapes digest), NVIDIA's code
NVIDIA = {
    (0, 0): (55_732_739, 424, "36feb01635dd8833"),
    (0, 9): (55_733_891, 425, "9496fdbee7948af7"),  # edm-cifar10-32x32-uncond-vp.pkl's shape
    (10, 0): (55_734_147, 426, "fb4080ba5775f3f2"),
    (10, 9): (55_735_299, 427, "4b05ff68e3064048"),  # edm-cifar10-32x32-cond-vp.pkl's shape
}

# NVIDIA's SongUNet(img_resolution=8, in/out_channels=3, label_dim=10, augment_dim=9,
# model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0, DDPM++
# settings) in float64, eval, parameter i (sorted by name) set to
# 0.3 sin(0.37 arange(numel) + i); input sin(0.11 arange(2*3*8*8)); labels one-hot 3 and 7.
# Their attention weights are computed in float32 by design; for these float64 references a
# scratch shim computed them in float64 (the same formula).
GOLDEN = {  # sigma -> (sum, sum of squares, y[1, 2, 5, 3], sum with no labels)
    0.002: (85.2978527571149, 280.89072277071074, 1.102024623243179, 84.947648207797),
    2.5: (85.07583244091342, 279.86999171694634, 1.0898595234815642, 84.6736151901961),
    80.0: (87.61806940073475, 293.22532345807144, 1.111414089560578, 87.73802933731842),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _digest(state: dict) -> str:
    text = "".join(f"{k}:{list(v.shape)}\n" for k, v in state.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("label_dim, augment_dim", list(NVIDIA))
def test_names_shapes_and_count_match_nvidia(label_dim, augment_dim):
    net = DDPMpp(32, 3, 3, label_dim=label_dim, augment_dim=augment_dim, **CIFAR10)
    count, tensors, digest = NVIDIA[(label_dim, augment_dim)]
    assert nets.count_parameters(net) == count
    state = net.state_dict()
    assert len(state) == tensors and _digest(state) == digest


def test_harness_build_is_the_uncond_cifar_network():
    net = nets.build("ddpmpp", (3, 32, 32))
    assert isinstance(net, DDPMpp)
    assert nets.count_parameters(net) == NVIDIA[(0, 0)][0]
    assert _digest(net.state_dict()) == NVIDIA[(0, 0)][2]
    assert net.state_dict()["enc.16x16_down.conv0.resample_filter"].shape == (1, 1, 2, 2)


def test_golden_outputs_float64():
    net = DDPMpp(8, 3, 3, label_dim=10, augment_dim=9, model_channels=16, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(4,), dropout=0.0).double().eval()
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(net.named_parameters())):
            arange = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_(0.3 * torch.sin(arange * 0.37 + i).reshape(p.shape))
    x = torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.11).reshape(2, 3, 8, 8)
    labels = torch.zeros(2, 10, dtype=torch.float64)
    labels[0, 3] = labels[1, 7] = 1
    for sigma, (total, sq, point, total0) in GOLDEN.items():
        c = torch.full((2,), math.log(sigma) / 4, dtype=torch.float64)
        with torch.no_grad():
            y = net(x, c, labels)
            y0 = net(x, c)  # no labels: the all-zero label vector, as EDMPrecond passes
        assert y.sum().item() == pytest.approx(total, rel=1e-11)
        assert y.square().sum().item() == pytest.approx(sq, rel=1e-11)
        assert y[1, 2, 5, 3].item() == pytest.approx(point, rel=1e-11)
        assert y0.sum().item() == pytest.approx(total0, rel=1e-11)


def test_groups_cover_every_parameter_once():
    for net in (nets.build("ddpmpp", (3, 32, 32)),
                DDPMpp(32, 3, 3, label_dim=10, augment_dim=9, **CIFAR10)):
        groups = nets.parameter_groups(net)
        assert set(groups) == set(GROUPS) and all(groups.values())
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in net.named_parameters())
    g = {n: nets.group_of(n) for n, _ in net.named_parameters()}
    assert g["enc.32x32_conv.weight"] == "input"
    assert g["enc.32x32_block0.conv0.weight"] == g["enc.16x16_down.skip.weight"] == "encoder"
    assert g["dec.8x8_in0.qkv.weight"] == g["dec.8x8_in1.affine.bias"] == "middle"
    assert g["dec.8x8_block0.conv0.weight"] == g["dec.16x16_up.conv0.weight"] == "decoder"
    assert g["dec.16x16_block4.proj.weight"] == "decoder"
    assert groups["output"] == ["dec.32x32_aux_norm.weight", "dec.32x32_aux_norm.bias",
                                "dec.32x32_aux_conv.weight", "dec.32x32_aux_conv.bias"]
    assert set(groups["embedding"]) == {"map_label.weight", "map_label.bias",
                                        "map_augment.weight", "map_layer0.weight",
                                        "map_layer0.bias", "map_layer1.weight",
                                        "map_layer1.bias"}
    # the other architectures keep their first-component groups
    assert nets.group_of("encoder.3.conv0.weight") == "encoder"
    assert nets.group_of("head.4.weight") == "head"


def test_ratio_net_is_the_encoder_half():
    shape = (3, 32, 32)
    gen, ratio = nets.build("ddpmpp", shape), nets.build_ratio("ddpmpp", shape)
    gen_state = gen.state_dict()
    shared = {k for k in ratio.state_dict() if not k.startswith("head.")}
    assert shared <= set(gen_state)
    assert {k.split(".")[0] for k in shared} == {"map_layer0", "map_layer1", "enc", "dec"}
    assert {k.split(".")[1] for k in shared if k.startswith("dec.")} == {"8x8_in0", "8x8_in1"}
    assert {nets.group_of(n) for n, _ in ratio.named_parameters()} == {
        "embedding", "input", "encoder", "middle", "head"}
    state = init_aux("teacher", gen_state, lambda: nets.build_ratio("ddpmpp", shape), 0)
    assert all(torch.equal(state[k], gen_state[k]) for k in shared)
    ratio.load_state_dict(state)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert ratio(x, torch.zeros(2)).shape == (2,)
        assert nets.RatioNet(ratio, 0.5)(x, 2.5).shape == (2,)


def test_denoiser_forward_and_training_mode():
    torch.manual_seed(0)
    net = DDPMpp(8, 1, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.5)
    d = Denoiser(net, 0.5)
    x = torch.randn(3, 1, 8, 8)
    out = d(x, 2.5)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert torch.equal(d(x, 2.5), d(x, 2.5))  # eval: no dropout
        assert not torch.equal(net.train()(x, torch.zeros(3)), net.eval()(x, torch.zeros(3)))


def test_conditional_label_handling():
    torch.manual_seed(0)
    net = DDPMpp(8, 3, 3, label_dim=10, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.0, label_dropout=1.0).eval()
    with torch.no_grad():
        for p in net.parameters():  # away from the architecture's near-zero output init
            p.add_(0.1 * torch.randn_like(p))
        x, c = torch.randn(2, 3, 8, 8), torch.zeros(2)
        labels = torch.eye(10)[[2, 5]]
        assert torch.equal(net(x, c), net(x, c, torch.zeros(2, 10)))
        assert not torch.allclose(net(x, c, labels), net(x, c))
        net.train()  # label_dropout 1: every label dropped
        assert torch.allclose(net(x, c, labels), net.eval()(x, c))


@pytest.mark.parametrize("shape, match", [((2,), "for images"), ((3, 30, 30), "divisible by 4")])
def test_build_checks(shape, match):
    with pytest.raises(nets.ArchError, match=match):
        nets.build("ddpmpp", shape)


def test_memory_layout_is_kept():
    """An attention block returns its input's layout (SDPA's output is a strided view): NCHW
    stays NCHW, so dropout masks are drawn as EDM draws them (same RNG -> same masks, checked
    against EDM in train mode), and an NHWC (channels_last) network stays NHWC."""
    torch.manual_seed(0)
    net = DDPMpp(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.0).eval()
    block = net.dec["4x4_in0"]
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    assert block(x, emb).is_contiguous()
    nhwc = block(x.to(memory_format=torch.channels_last), emb)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    img, c = torch.randn(2, 3, 8, 8), torch.zeros(2)
    with torch.no_grad():
        ref = net(img, c)
        nhwc_net = net.to(memory_format=torch.channels_last)
        out = nhwc_net(img.to(memory_format=torch.channels_last), c)
    assert torch.allclose(ref, out, atol=1e-6, rtol=1e-5)
