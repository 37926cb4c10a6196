"""Init schemes (SPEC §4): exactly which tensors equal the teacher's, determinism, pinning."""
import pytest
import torch

from harness import inits, nets
from harness.config import GROUPS
from harness.diffusion import Denoiser, OneStepGenerator
from harness.train import build_student

SHAPE = (1, 8, 8)


def build():
    return nets.build("unet-xs", SHAPE)


@pytest.fixture(scope="module")
def teacher_state():
    """A 'trained' teacher: fresh weights moved off any architecture init."""
    torch.manual_seed(123)
    state = build().state_dict()
    return {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}


def equal_names(state, teacher_state):
    return {k for k in state if torch.equal(state[k], teacher_state[k])}


def names_in(groups):
    return {k for k in build().state_dict() if nets.group_of(k) in groups}


def test_teacher_is_exact_copy(teacher_state):
    out = inits.init_generator({"name": "teacher"}, teacher_state, build, seed=0)
    assert equal_names(out.state, teacher_state) == set(teacher_state)
    assert out.sigma_feat is None
    out.state["input.weight"].add_(1)  # a copy, not a view
    assert not torch.equal(out.state["input.weight"], teacher_state["input.weight"])


def test_random_shares_nothing_is_seeded_and_differs_across_seeds(teacher_state):
    a = inits.init_generator({"name": "random"}, teacher_state, build, seed=0).state
    b = inits.init_generator({"name": "random"}, teacher_state, build, seed=0).state
    c = inits.init_generator({"name": "random"}, teacher_state, build, seed=1).state
    assert equal_names(a, teacher_state) == set()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differs = {k for k in a if not torch.equal(a[k], c[k])}
    # norm weights/biases (ones/zeros) are equal by construction; every conv/linear differs
    assert {k for k in a if k.endswith("conv0.weight") or k == "input.weight"} <= differs


@pytest.mark.parametrize("groups", [["output"], ["encoder", "middle", "decoder"], ["embedding"],
                                    ["input", "output"], list(GROUPS)])
def test_reset_layers_resets_exactly_the_named_groups(teacher_state, groups):
    out = inits.init_generator({"name": "reset_layers", "groups": groups}, teacher_state, build, 3)
    assert equal_names(out.state, teacher_state) == set(teacher_state) - names_in(groups)
    again = inits.init_generator({"name": "reset_layers", "groups": groups}, teacher_state, build, 3)
    other = inits.init_generator({"name": "reset_layers", "groups": groups}, teacher_state, build, 4)
    assert all(torch.equal(out.state[k], again.state[k]) for k in out.state)
    assert any(not torch.equal(out.state[k], other.state[k]) for k in names_in(groups))
    fresh = inits.fresh_state(build, inits.derive_seed(3, "generator-init"))
    assert all(torch.equal(out.state[k], fresh[k]) for k in names_in(groups))


def test_feature_transplant_resets_output_and_pins(teacher_state):
    out = inits.init_generator({"name": "feature_transplant", "sigma_feat": 0.2}, teacher_state, build, 0)
    assert equal_names(out.state, teacher_state) == set(teacher_state) - names_in(["output"])
    assert out.sigma_feat == 0.2


def _generator(state, sigma_feat, teacher_state=None):
    net = build()
    net.load_state_dict(state)
    return OneStepGenerator(Denoiser(net, 0.5), 2.5, sigma_feat).eval()


def test_pinned_conditioning_really_feeds_sigma_feat(teacher_state):
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    plain = _generator(teacher_state, None)
    with torch.no_grad():
        base = plain(z)
        # same weights, conditioning pinned at sigma_init: identical to the plain generator
        assert torch.equal(_generator(teacher_state, 2.5)(z), base)
        outs = [_generator(teacher_state, s)(z) for s in (0.002, 0.2, 20.0)]
    assert all(not torch.allclose(o, base) for o in outs)
    assert not torch.allclose(outs[0], outs[1])
    # the network really receives c_noise(sigma_feat) while preconditioning stays at sigma_init
    seen = []
    gen = _generator(teacher_state, 0.2)
    gen.denoiser.net.embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        gen(z)
    ref = nets.unet.positional_embedding(torch.full((4,), torch.log(torch.tensor(0.2)) / 4), 32)
    assert torch.allclose(seen[0], ref)


def test_build_student_wires_transplant_and_aux_init(teacher_state):
    cfg = {"teacher": {"arch": "unet-xs"}, "seed": 0,
           "student": {"sigma_init": 2.5, "aux_init": "teacher", "ratio_net": "encoder"},
           "init": {"name": "feature_transplant", "sigma_feat": 20.0},
           "loss": {"name": "ratio", "divergence": "kl", "sigma": "schedule"}}
    gen, aux = build_student(cfg, teacher_state, SHAPE, 0.5)
    assert gen.sigma_feat == 20.0 and gen.sigma_init == 2.5
    aux_state = aux.net.state_dict()
    shared = {k for k in aux_state if nets.group_of(k) != "head"}
    assert all(torch.equal(aux_state[k], teacher_state[k]) for k in shared)
    cfg["student"]["aux_init"] = "random"
    cfg["loss"] = {"name": "sid", "alpha": 1.2}
    _, aux = build_student(cfg, teacher_state, SHAPE, 0.5)
    assert not any(torch.equal(v, teacher_state[k]) for k, v in aux.net.state_dict().items()
                   if k.endswith("weight") and v.ndim > 1)


def test_errors(teacher_state):
    with pytest.raises(inits.InitError, match="sigma_feat > 0"):
        inits.init_generator({"name": "feature_transplant", "sigma_feat": 0.0}, teacher_state, build, 0)
    with pytest.raises(KeyError, match="known: feature_transplant, random, reset_layers, teacher"):
        inits.init_generator({"name": "shuffle"}, teacher_state, build, 0)
    other = nets.build("unet-s", (1, 32, 32)).state_dict()
    for scheme in ("teacher", "random"):
        with pytest.raises(inits.InitError, match="teacher's weights do not fit"):
            inits.init_generator({"name": scheme}, other, build, 0)
    with pytest.raises(inits.InitError, match="teacher's weights do not fit"):
        inits.init_generator({"name": "reset_layers", "groups": ["output"]}, other, build, 0)
