"""Every parameter belongs to exactly one named group (SPEC §4); shapes; errors."""
import pytest
import torch

from harness.core import nets
from harness.declare.config import GROUPS

ARCHS = [("mlp", (2,)), ("unet-xs", (1, 8, 8)), ("unet-s", (1, 32, 32))]


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_groups_partition_parameters(arch, shape):
    net = nets.build(arch, shape)
    groups = nets.parameter_groups(net)
    assert set(groups) == set(GROUPS)
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())
    assert all(groups[g] for g in GROUPS)


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_ratio_net_is_encoder_half_plus_head(arch, shape):
    full, ratio = nets.build(arch, shape), nets.build_ratio(arch, shape)
    groups = nets.parameter_groups(ratio)
    assert set(groups) == {"input", "encoder", "middle", "embedding", "head"}
    full_shapes = dict((n, p.shape) for n, p in full.named_parameters())
    for name, p in ratio.named_parameters():
        if nets.group_of(name) != "head":
            assert full_shapes[name] == p.shape
    assert nets.count_parameters(ratio) < 0.7 * nets.count_parameters(full)
    logit = nets.RatioNet(ratio, 0.5)(torch.randn(3, *shape), torch.tensor([0.1, 1.0, 10.0]))
    assert logit.shape == (3,)


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_output_shape(arch, shape):
    net = nets.build(arch, shape)
    assert net(torch.randn(2, *shape), torch.zeros(2)).shape == (2, *shape)


def test_architecture_errors():
    with pytest.raises(nets.ArchError, match="toy 2-D"):
        nets.build("mlp", (1, 8, 8))
    with pytest.raises(nets.ArchError, match="unknown architecture 'huge'"):
        nets.build("huge", (1, 8, 8))
    with pytest.raises(nets.ArchError, match="divisible"):
        nets.build("unet-s", (1, 6, 6))
