"""How the training step runs fast: precision, memory layout and compilation.

Three settings of ``student`` (and of ``teacher``, for teacher training), applied here and only
here (``train.train_student``, ``teacher.load_or_train`` and ``harness bench`` call ``apply``, so
the bench measures exactly the step the cells run):

- ``precision`` (part of the cell id: it changes the numbers): ``fp32`` runs IEEE float32
  matmuls *and* convolutions on CUDA (PyTorch's own default lets cuDNN use TF32 for
  convolutions); ``tf32`` lets both use TF32 tensor cores; ``bf16`` adds bfloat16 autocast
  around every forward pass (optimizer state, EMA, losses' reductions stay float32), on a CPU as
  on CUDA, so a bf16 study rehearsed on a CPU runs the same mixed-precision code. On a CPU
  ``fp32`` and ``tf32`` are the same float32 arithmetic.
- ``channels_last`` and ``compile`` (not part of the cell id: execution only, numbers agree to
  float rounding; a checkpoint written with one setting resumes with the other): the networks'
  4-D weights in NHWC layout, and ``torch.compile`` of the generator, auxiliary net and teacher.
  The uncompiled modules keep the parameters and the state dicts, so checkpoints never carry
  ``_orig_mod.`` prefixes.

On CUDA, cuDNN autotuning (``cudnn.benchmark``) is always on: every step has the same shapes, and
EDM's training loop does the same.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from harness.declare.config import PRECISIONS, ConfigError


def set_precision(precision: str) -> None:
    """Process-wide float32 behaviour of CUDA matmuls and cuDNN convolutions (no-op on CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; known: {', '.join(PRECISIONS)}")
    mode = "ieee" if precision == "fp32" else "tf32"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for ``bf16`` (CUDA or CPU); nothing otherwise."""
    kind = torch.device(device).type
    if precision == "bf16" and kind in ("cuda", "cpu"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Step:
    """The autocast to wrap forward passes in, and ``step(m)``: the function to call for ``m``."""

    amp: contextlib.AbstractContextManager
    compiled: dict[int, Callable]

    def __call__(self, module: torch.nn.Module) -> Callable:
        return self.compiled.get(id(module), module)


def apply(settings: dict, device, modules: list[torch.nn.Module]) -> Step:
    """Set precision, move ``modules`` to channels_last if asked, and return the callables.

    ``settings``: the resolved ``student`` (or ``teacher``) section.
    ``modules`` are changed in place (layout only); ``step(m)`` gives the function to call for
    module ``m``: ``torch.compile(m)`` when ``compile`` is on (one compiled wrapper per module,
    sharing its parameters), else ``m`` itself.
    """
    precision = settings.get("precision", "fp32")
    set_precision(precision)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune convolutions (as EDM does)
    if settings.get("channels_last"):
        for m in modules:
            m.to(memory_format=torch.channels_last)
    compiled = {id(m): torch.compile(m) for m in modules} if settings.get("compile") else {}
    return Step(autocast(precision, device), compiled)


def pick_device(device: str | None = "auto") -> str:
    """``auto`` (or None) -> cuda where there is one, else cpu; a CUDA device this machine lacks
    is a user error (ConfigError, exit 2) raised before anything trains or is scored. The one
    place a device is chosen: commands, cells, teachers and the metrics all ask here."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device!r} asked for, but this machine has no CUDA device "
                                      f"torch can use (torch {torch.__version__}, built for CUDA "
                                      f"{torch.version.cuda or 'none'}); use --device cpu or auto. "
                                      f"Nothing was run.")
    return device
