"""NVIDIA's published EDM networks (NVlabs/edm pickles), read without running their code.

An EDM training snapshot (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-uncond-vp.pkl``) is
a plain pickle of ``{'ema': EDMPrecond, 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': {...}}``. Each network object was pickled through EDM's
``torch_utils.persistence``, which stores the *source code* of its Python module inside the pickle;
unpickling it normally calls ``torch_utils.persistence._reconstruct_persistent_obj``, which
``exec``s that source. ``load_edm_pickle`` never does: a restricted unpickler resolves only

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> a ``PersistentRecord`` (class name,
  persistence version, the sha256 of the embedded source, the object's state as plain data;
  the source is neither kept nor run);
- the classes of plain ``torch.nn`` containers (``torch.nn.modules.*``, e.g. ``ModuleDict``)
  -> inert ``ModuleRecord`` objects holding the pickled state (no torch class is instantiated);
- tensor rebuilding: ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state`` (our own versions: backward hooks and Python attributes are
  dropped), and ``torch.storage._load_from_bytes`` (the storage bytes are read with
  ``torch.load(weights_only=True)``, torch's own restricted loader);
- ``collections.OrderedDict``, ``builtins.set``/``frozenset``, ``_codecs.encode`` (str to
  latin-1 bytes only: how protocol 2 stores bytes), NumPy scalars
  (``numpy.core.multiarray.scalar`` with ``numpy.dtype``: numeric dtypes only, decoded from
  their bytes) and ``dnnlib.util.EasyDict`` (read as a plain dict).

Any other global (``os.system``, ``builtins.exec``, ``subprocess.*``, a torch function outside
the list...) raises ``EDMImportError`` at the moment the unpickler meets it, before anything it
names is called: nothing from the file is executed. Persistent ids (torch.save's zip format)
are refused the same way.

From the records, ``load_edm_pickle`` builds the flat state dict (parameters and persistent
buffers, nested modules included, ``None`` entries skipped, exactly as ``Module.state_dict``
would) of the network under ``key`` (``ema``), and its metadata. Mapping the records onto the harness's DDPM++ is ``harness.core.edm_ddpmpp``.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle

import numpy as np
import torch

from harness.base.safefs import UnsafePathError, read_regular


class EDMImportError(ValueError):
    """An EDM pickle could not be read (safely) or does not hold a network we support."""


class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj`` would have rebuilt, as data."""

    def __init__(self, class_name: str, version, source_sha256: str, state: dict):
        self.class_name = class_name
        self.version = version
        self.source_sha256 = source_sha256
        self.state = state

    def __repr__(self):
        return f"PersistentRecord({self.class_name})"


class ModuleRecord:
    """A pickled plain ``torch.nn`` object (e.g. ``ModuleDict``): its class name and state."""

    qualname = "?"

    def __setstate__(self, state):
        self.state = state

    @property
    def class_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self):
        return f"ModuleRecord({self.qualname})"


MAX_BYTES = 4 << 30  # NVIDIA's largest EDM snapshot is under 1 GB
BYTES_PER_VISIT = 64  # walks over the loaded objects: at most one visit per 64 file bytes (+ 10k)
MAX_DEPTH = 64  # nesting of modules and metadata


class _Budget:
    """The work one load may do after unpickling, bounded by the file's size: a few KB of
    pickle can name the same object exponentially often (shared references), so every walk
    over the loaded objects counts its visits and stops with a refusal at the bound."""

    def __init__(self, where: str, size: int):
        self.where, self.left = where, 10_000 + size // BYTES_PER_VISIT

    def visit(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0 or depth > MAX_DEPTH:
            raise EDMImportError(f"{self.where}: its objects nest deeper than {MAX_DEPTH} or "
                                 f"repeat shared references beyond what a file of its size can "
                                 f"hold honestly; refused (nothing from it was executed)")


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" \
            or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("module_src"), str):
        raise EDMImportError("a torch_utils.persistence record without the expected fields "
                             "(type 'class', class_name, module_src); nothing was executed")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise EDMImportError(f"the persistent {meta['class_name']} record's state is not a dict")
    src_hash = hashlib.sha256(meta["module_src"].encode()).hexdigest()
    return PersistentRecord(meta["class_name"], meta.get("version"), src_hash, dict(state))


def _load_storage(data):
    if not isinstance(data, (bytes, bytearray)):
        raise EDMImportError("torch.storage._load_from_bytes got no bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted loader refused or the bytes are corrupt
        raise EDMImportError(f"a tensor storage could not be read with torch.load(weights_only="
                             f"True): {e}") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise EDMImportError(f"a tensor storage decoded to {type(storage).__name__}")
    nbytes = (storage._untyped_storage if isinstance(storage, torch.TypedStorage)
              else storage).nbytes()
    if nbytes > len(data):
        raise EDMImportError(f"a tensor storage of {nbytes} bytes came from "
                             f"{len(data)} bytes of pickle")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
    if not isinstance(storage, torch.TypedStorage):
        raise EDMImportError("a tensor record does not point at a tensor storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and type(offset) is int and all(type(v) is int for v in (*size, *stride))
            and offset >= 0 and all(v >= 0 for v in (*size, *stride))):
        raise EDMImportError("a tensor record has a malformed size, stride or offset")
    # set_ would grow the storage to fit (uninitialised memory read as weights): the record
    # must lie inside the storage it names
    elements = storage._untyped_storage.nbytes() // torch.empty((), dtype=storage.dtype).element_size()
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= elements:
        raise EDMImportError(f"a tensor record of size {list(size)[:8]} at offset {offset} "
                             f"reaches past its storage of {elements} elements")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage._untyped_storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise EDMImportError("a parameter record does not hold a tensor")
    return data  # a plain tensor: the state dict needs the values only


class _DType:
    """``numpy.dtype(name, align, copy)`` as data; ``_np_scalar`` decodes numeric ones only."""

    def __init__(self, name, align=False, copy=True):
        self.name, self.byteorder = name, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(dtype.name, str) \
            or not isinstance(data, bytes):
        raise EDMImportError("a NumPy scalar record is malformed")
    try:
        dt = np.dtype(dtype.name)
    except TypeError:
        raise EDMImportError(f"a NumPy scalar of unknown dtype {dtype.name!r}") from None
    if dt.kind not in "biufc" or len(data) != dt.itemsize:
        raise EDMImportError(f"a NumPy scalar of dtype {dtype.name!r} is not a plain number")
    if dtype.byteorder in "<>":
        dt = dt.newbyteorder(dtype.byteorder)
    return np.frombuffer(data, dtype=dt)[0].item()


class _EasyDict(dict):
    pass


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode``, as protocol-2 pickles store bytes: str -> bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EDMImportError("a _codecs.encode record other than str -> latin1 bytes")
    return text.encode("latin1")


SAFE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 names
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (not the C one: a 9-byte memo index makes that allocate gigabytes;
    this one keeps the memo in a dict and reads lengths against the bytes actually there), with
    a whitelist of globals and no attribute setting on classes (``BUILD`` on a class would change
    every later load in the process). Record classes are made afresh for every load."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where
        self._records: dict[str, type] = {}

    def _load_build(self):
        if isinstance(self.stack[-2], type) or not isinstance(
                self.stack[-2], (ModuleRecord, _DType, _EasyDict, set, dict, list)):
            raise EDMImportError(f"{self.where}: the pickle sets the state of a "
                                 f"{type(self.stack[-2]).__name__}; refused")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module, name):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module.startswith("torch.nn.modules.") and name.isidentifier() \
                and not name.startswith("_"):
            qualname = f"{module}.{name}"
            if qualname not in self._records:
                self._records[qualname] = type(name, (ModuleRecord,), {"qualname": qualname})
            return self._records[qualname]
        raise EDMImportError(
            f"{self.where}: the pickle references the global {module}.{name}, which an EDM "
            f"network pickle does not need; refused before it was called (nothing from the file "
            f"was executed). Only tensors, torch_utils.persistence records, torch.nn containers, "
            f"OrderedDict/set, NumPy scalars and EasyDict are read.")

    def persistent_load(self, pid):
        raise EDMImportError(f"{self.where}: the pickle uses persistent ids ({str(pid)[:40]}), "
                             f"which EDM's pickles do not (is it a torch.save file?); refused")


def _is_record(obj) -> bool:
    return isinstance(obj, (PersistentRecord, ModuleRecord))


def flat_state(record, prefix: str = "", budget: _Budget | None = None,
               depth: int = 0) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record and its submodules, by dotted name,
    in ``Module.state_dict`` order (own parameters, own buffers, then submodules)."""
    budget = budget or _Budget("the pickle", 1 << 20)
    budget.visit(depth)
    state = record.state if isinstance(getattr(record, "state", None), dict) else {}
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise EDMImportError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach()
    for name, sub in (state.get("_modules") or {}).items():
        if sub is None:
            continue
        if not _is_record(sub):
            raise EDMImportError(f"submodule {prefix}{name} is a {type(sub).__name__}")
        out.update(flat_state(sub, f"{prefix}{name}.", budget, depth + 1))
    return out


def plain(value, depth: int = 0, budget: _Budget | None = None):
    """JSON-friendly copy of pickled metadata (records become their class names)."""
    if budget is not None:
        budget.visit(depth)
    if depth > 20:
        return "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1, budget) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v, depth + 1, budget) for v in value), key=str)
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1, budget) for k, v in value.items()}
    if _is_record(value):
        return f"<{value.class_name}>"
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)}>"
    return f"<{type(value).__name__}>"


def _classes(record, out: set, budget: _Budget, depth: int = 0) -> set:
    budget.visit(depth)
    out.add(record.class_name)
    for sub in (record.state.get("_modules") or {}).values():
        if _is_record(sub):
            _classes(sub, out, budget, depth + 1)
    return out


def _init_kwargs(record, budget: _Budget):
    kw = record.state.get("_init_kwargs")
    return plain(kw, 0, budget) if isinstance(kw, dict) else None


def load_edm_pickle(path: str, key: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """(flat state dict, metadata) of the network ``key`` of an EDM pickle; executes nothing.

    The state dict keeps EDM's names (an ``EDMPrecond`` holds its network as ``model.*``).
    ``meta``: ``sha256`` (of the file), ``keys`` (of the pickled dict), ``contents`` (class or
    type per key), ``class_name`` / ``init_args`` / ``init_kwargs`` / ``source_sha256`` /
    ``persistence_version`` of the network, ``attrs`` (its plain scalar attributes, e.g.
    ``sigma_data``), ``model_class`` / ``model_init_kwargs`` (of its ``model`` submodule),
    ``classes`` (every class name in the network) and ``dataset_kwargs`` when present.
    """
    try:
        raw = read_regular(str(path), MAX_BYTES, "EDM pickle")
    except UnsafePathError as e:
        raise EDMImportError(str(e)) from None
    except OSError as e:
        raise EDMImportError(f"cannot read the EDM pickle {path}: {e.strerror}") from None
    sha = hashlib.sha256(raw).hexdigest()
    budget = _Budget(str(path), len(raw))
    try:
        obj = _Unpickler(io.BytesIO(raw), path).load()
        return _read_loaded(obj, path, key, sha, budget)
    except EDMImportError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure: a malformed record, not code
        raise EDMImportError(f"{path} is not a readable EDM pickle ({type(e).__name__}: "
                             f"{str(e)[:200]}); nothing from it was executed") from None


def _read_loaded(obj, path, key: str, sha: str, budget: _Budget):
    if not isinstance(obj, dict) or key not in obj:
        keys = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
        raise EDMImportError(f"{path}: expected a dict with the network under {key!r} (an EDM "
                             f"training snapshot); found {keys}")
    net = obj[key]
    if not _is_record(net) or not isinstance(getattr(net, "state", None), dict):
        raise EDMImportError(f"{path}: {key!r} holds a {type(net).__name__}, not a network")
    state = flat_state(net, "", budget)
    model = (net.state.get("_modules") or {}).get("model")
    attrs = {k: v for k, v in net.state.items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    meta = {
        "sha256": sha,
        "path": str(path),
        "key": key,
        "keys": sorted(map(str, obj)),
        "contents": {str(k): (v.class_name if _is_record(v) else type(v).__name__)
                     for k, v in obj.items()},
        "class_name": net.class_name,
        "persistence_version": getattr(net, "version", None),
        "source_sha256": getattr(net, "source_sha256", None),
        "init_args": plain(net.state.get("_init_args"), 0, budget),
        "init_kwargs": _init_kwargs(net, budget),
        "attrs": attrs,
        "model_class": model.class_name if _is_record(model) else None,
        "model_init_kwargs": _init_kwargs(model, budget) if _is_record(model) else None,
        "classes": sorted(_classes(net, set(), budget)),
        "parameters": sum(t.numel() for k, t in state.items()
                          if not k.endswith("resample_filter")),
    }
    if isinstance(obj.get("dataset_kwargs"), dict):
        meta["dataset_kwargs"] = plain(obj["dataset_kwargs"], 0, budget)
    return state, meta
