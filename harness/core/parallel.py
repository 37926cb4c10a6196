"""Data-parallel training of one cell (``resources: {workers: W}``): what the ONE loop needs.

``train.train_student`` runs unchanged on every one of W Ray Train workers, with a ``Shard`` that
says which rank it is. Three hooks, and nothing else, make the W copies one training run:

- ``wrap``: the generator and the auxiliary net go through ``ray.train.torch.prepare_model``
  (``DistributedDataParallel``; gloo on CPU, NCCL on GPU, the process group is Ray Train's), so
  every backward pass all-reduces (averages) the gradients. Each rank's loss is the mean over its
  ``batch / W`` samples, so the average of the W gradients is the gradient of the global batch's
  mean loss, up to the order of float additions.
- ``draws``: the random draws of one training step. Every rank keeps the *same* random stream as
  the single-worker run (``inits.derive_seed(seed, "train")``; it is derived explicitly, and it
  is the same on every rank, so the one RNG state in rank 0's checkpoint is every rank's), and
  each per-sample draw (``randn``, ``rand``, ``randint``, ``randn_like``, ``rand_like`` whose
  first dimension is the local batch) is drawn for the whole global batch and cut to this rank's
  rows ``[r B/W, (r+1) B/W)``. The union of the W ranks' samples, noise levels and noises is then
  exactly the single worker's batch, bit for bit, and the stream advances as the single worker's
  does. (Independent streams per rank, e.g. ``derive_seed(seed, f"train-rank{r}")``, would be
  deterministic too, but a W-worker run would then be a different sample path from the 1-worker
  run of the same cell id: ``workers`` is a scheduling setting, never part of a cell id, so it
  must not change the numbers beyond float rounding.) The price: each rank draws W times the
  random numbers it uses, which is negligible beside the networks. Random functions that this
  cannot cut (``normal``, ``bernoulli``, ``multinomial``, ``randperm``, in-place ``normal_`` ...)
  raise inside a data-parallel step instead of silently giving each rank the same draws.
  ``F.dropout`` draws its mask inside ATen, where no hook sees it, so it is cut the same way: the
  mask of the whole batch is drawn (dropout of a tensor of ones, the global batch's shape and
  layout) and this rank's input is multiplied by its rows; the other dropout variants raise.
- ``all_finite``: the divergence check all-reduces the losses, so every rank stops at the same
  step (a rank that stopped alone would leave the others waiting in the next all-reduce).

Checkpoints, evaluations and result rows are rank 0's alone (``lead``). Networks must not couple
samples of a batch: GroupNorm (UNet, DDPM++) and LayerNorm (MLP) are per sample, and there is no
BatchNorm in ``harness.core.nets``, so a rank's forward pass on its rows is the single worker's on
those rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SIZED = (torch.randn, torch.rand, torch.randint)
_LIKE = (torch.randn_like, torch.rand_like)
_REFUSED = {torch.normal, torch.bernoulli, torch.multinomial, torch.randperm, torch.poisson,
            torch.randint_like, torch.Tensor.normal_, torch.Tensor.uniform_,
            torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.exponential_,
            torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_,
            F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


class ParallelError(ValueError):
    """A data-parallel setting that cannot work (the message names it and the fix)."""


def _size(func, args, kwargs) -> tuple[tuple, int | None, str | None]:
    """(size, index of the size among args or None, kwarg name or None) of a sized draw."""
    if "size" in kwargs:
        return tuple(kwargs["size"]), None, "size"
    if func is torch.randint:  # randint(high, size) | randint(low, high, size)
        for i in range(len(args) - 1, -1, -1):
            if isinstance(args[i], (tuple, list, torch.Size)):
                return tuple(args[i]), i, None
        return (), None, None
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0]), 0, None
    return tuple(args), -1, None  # randn(2, 3): the sizes are the positional arguments


class _RankRows(TorchFunctionMode):
    """Per-sample draws of the global batch, cut to this rank's rows (see the module doc)."""

    def __init__(self, rank: int, world: int, local: int):
        super().__init__()
        self.rank, self.world, self.local = rank, world, local

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank * self.local:(self.rank + 1) * self.local]

    def _global(self, x: torch.Tensor, fill) -> torch.Tensor:
        """A tensor of the global batch's shape, ``x``'s dtype, device and memory layout (a
        draw fills memory in layout order, so the layout must be the single worker's)."""
        big = torch.empty((x.shape[0] * self.world, *x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        if x.dim() == 4 and not x.is_contiguous() and \
                x.is_contiguous(memory_format=torch.channels_last):
            big = big.contiguous(memory_format=torch.channels_last)
        return big.fill_(fill)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED:
            size, at, key = _size(func, args, kwargs)
            if size and size[0] == self.local:
                full = (size[0] * self.world, *size[1:])
                if key:
                    kwargs = {**kwargs, key: full}
                elif at == -1:
                    args = full
                else:
                    args = (*args[:at], full, *args[at + 1:])
                return self._rows(func(*args, **kwargs))
        elif func in _LIKE:
            x = args[0]
            if x.dim() and x.shape[0] == self.local:
                return self._rows(func(self._global(x, 0.0), *args[1:], **kwargs))
        elif func is F.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
            if training and p > 0 and x.dim() and x.shape[0] == self.local:
                noise = self._rows(F.dropout(self._global(x, 1.0), p, True))  # mask / (1 - p)
                return x.mul_(noise) if inplace else x * noise
        elif func in _REFUSED:
            raise ParallelError(f"{getattr(func, '__qualname__', func)} is not cut into "
                                f"per-rank rows (harness.core.parallel): with resources.workers > 1 "
                                f"use torch.randn / rand / randint / randn_like / rand_like in "
                                f"the training step, or run this cell with workers: 1")
        return func(*args, **kwargs)


class Synced:
    """A module called through its DDP wrapper (``ddp``: gradients all-reduced) whose other
    attributes (``sigma_data``, ...) are the module's own, so loss code cannot tell."""

    def __init__(self, ddp, module: torch.nn.Module):
        self._ddp, self._module = ddp, module

    def __call__(self, *args, **kwargs):
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel cell: rank ``rank`` of ``world`` workers.

    ``Shard()`` (rank 0 of 1) is the single-process path: every hook is then a no-op."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one that evaluates, checkpoints and writes rows."""
        return self.rank == 0

    def local_batch(self, batch: int) -> int:
        if batch % self.world:
            raise ParallelError(f"student.batch {batch} cannot be split across {self.world} "
                                f"workers (resources.workers): use a batch that is a multiple "
                                f"of {self.world}, or another number of workers")
        return batch // self.world

    def draws(self, local: int):
        """Context of one training step's random draws (see the module doc)."""
        if self.world == 1:
            return contextlib.nullcontext()
        return _RankRows(self.rank, self.world, local)

    def wrap(self, module: torch.nn.Module, settings: dict):
        """What to call for ``module`` (already on its device, in its final memory layout):
        DDP through ``ray.train.torch.prepare_model`` (compiled when ``settings['compile']``)."""
        if self.world == 1:
            return module
        ddp = self.ddp(module)
        return Synced(torch.compile(ddp) if settings.get("compile") else ddp, module)

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel`` in Ray Train's process group (a Train worker only)."""
        from ray.train.torch import prepare_model

        return prepare_model(module, move_to_device=False)

    def all_finite(self, *losses: torch.Tensor) -> bool:
        """Whether every rank's losses are finite (one all-reduce when world > 1)."""
        values = torch.stack([loss.detach().float().reshape(()) for loss in losses])
        if self.world > 1:
            torch.distributed.all_reduce(values)  # a non-finite value anywhere stays non-finite
        return bool(torch.isfinite(values).all())


SINGLE = Shard()
