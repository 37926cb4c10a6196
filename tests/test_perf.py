"""harness.core.perf: precision flags, channels_last and torch.compile run the same step as eager
fp32 (to float rounding), keep checkpoints portable, and stay out of the cell id."""
import pytest
import torch

from harness.core import nets, perf
from harness.declare.config import resolve_cell
from harness.core.diffusion import Denoiser
from harness.declare.hashing import cell_id
from harness.core.train import CheckpointError, train_student

from conftest import toy_cfg

SHAPE = (1, 8, 8)


@pytest.fixture
def restore_precision():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize("precision, mode", [("fp32", "ieee"), ("tf32", "tf32"), ("bf16", "tf32")])
def test_precision_sets_cuda_matmul_and_cudnn_conv(precision, mode, restore_precision):
    perf.set_precision(precision)
    assert torch.backends.cuda.matmul.fp32_precision == mode
    assert torch.backends.cudnn.conv.fp32_precision == mode


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp16' unknown"):
        perf.set_precision("fp16")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_bf16_autocasts_on_cuda_and_cpu():
    assert isinstance(perf.autocast("bf16", "cuda"), torch.autocast)
    with perf.autocast("bf16", "cpu"):  # a bf16 study rehearsed on a CPU runs mixed precision
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    for precision in ("fp32", "tf32"):
        assert not isinstance(perf.autocast(precision, "cuda"), torch.autocast)
        assert not isinstance(perf.autocast(precision, "cpu"), torch.autocast)


def _image_cfg(**student):
    return resolve_cell({"data": {"name": "digits"}, "loss": "sid",
                         "student": {"kimg": 0.032, "batch": 8, **student},
                         "eval": {"n": 8, "every_kimg": 0.016, "samples": 2}})


def _train_image(cfg, ckpt, max_steps=None, device="cpu"):
    """Train a cell on random 1x8x8 data from a random unet-xs teacher; the checkpoint."""
    torch.manual_seed(0)
    teacher = Denoiser(nets.build("unet-xs", SHAPE), 0.5)
    data = torch.randn(64, *SHAPE, device=device).clamp(-1, 1)
    train_student(cfg, teacher, data, 0.5, lambda x: {}, str(ckpt), lambda ev: None,
                  device=device, max_steps=max_steps)
    return torch.load(ckpt, weights_only=True)


def test_channels_last_trains_the_same_and_checkpoints_resume_across_layouts(tmp_path):
    torch.set_num_threads(1)
    eager = _train_image(_image_cfg(channels_last=False), tmp_path / "eager.pt")
    nhwc = _train_image(_image_cfg(channels_last=True), tmp_path / "nhwc.pt")
    assert eager["step"] == nhwc["step"] == 4
    assert eager["generator"].keys() == nhwc["generator"].keys()
    worst = max((eager["generator"][k] - nhwc["generator"][k]).abs().max().item()
                for k in eager["generator"])
    assert worst < 1e-4
    convs = [v for v in nhwc["generator"].values() if v.ndim == 4 and v.shape[1] > 1
             and v.shape[2] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    # a checkpoint written in NHWC resumes in NCHW (execution settings are not the identity) ...
    _train_image(_image_cfg(channels_last=True), tmp_path / "mixed.pt", max_steps=2)
    mixed = _train_image(_image_cfg(channels_last=False), tmp_path / "mixed.pt")
    assert mixed["step"] == 4
    # ... but a checkpoint of another precision is another experiment
    _train_image(_image_cfg(), tmp_path / "prec.pt", max_steps=2)
    with pytest.raises(CheckpointError, match="another cell config"):
        _train_image(_image_cfg(precision="bf16"), tmp_path / "prec.pt")


def test_resume_is_exact_in_nhwc(tmp_path):
    torch.set_num_threads(1)
    straight = _train_image(_image_cfg(channels_last=True), tmp_path / "straight.pt")
    _train_image(_image_cfg(channels_last=True), tmp_path / "resumed.pt", max_steps=3)
    resumed = _train_image(_image_cfg(channels_last=True), tmp_path / "resumed.pt")
    for part in ("generator", "aux", "ema"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part])


def test_execution_settings_stay_out_of_the_cell_id():
    base = cell_id(_image_cfg(), "fp")
    assert cell_id(_image_cfg(channels_last=False, compile=True), "fp") == base
    assert cell_id(_image_cfg(precision="tf32"), "fp") != base


@pytest.mark.slow
def test_compile_trains_the_same_and_saves_plain_state_dicts(toy_teacher, tmp_path):
    """torch.compile (inductor, CPU C++ backend) of generator, fake score and teacher."""
    from test_train import _train

    torch.set_num_threads(1)
    cfg = toy_cfg(loss="sid", student={"kimg": 0.64, "batch": 64},
                  eval={"n": 100, "every_kimg": 0.32, "samples": 4})
    _train(cfg, toy_teacher, tmp_path / "eager.pt")
    _train({**cfg, "student": {**cfg["student"], "compile": True}}, toy_teacher,
           tmp_path / "compiled.pt")
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("eager.pt", "compiled.pt"))
    assert a["step"] == b["step"] == 10
    for part in ("generator", "aux", "ema"):
        assert a[part].keys() == b[part].keys()  # no _orig_mod. prefixes
        worst = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert worst < 1e-4, part


def test_teacher_precision_enters_the_ids_only_away_from_fp32():
    from harness.declare.hashing import teacher_id

    base = _image_cfg()
    bf16 = resolve_cell({**base, "teacher": {**base["teacher"], "precision": "bf16"}})
    nhwc = resolve_cell({**base, "teacher": {**base["teacher"], "channels_last": False}})
    assert teacher_id(bf16, "fp") != teacher_id(base, "fp") == teacher_id(nhwc, "fp")
    assert cell_id(bf16, "fp") != cell_id(base, "fp") == cell_id(nhwc, "fp")
