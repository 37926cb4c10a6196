"""The torch-fidelity glue the evaluator uses: the domain classifier and a local Inception weights
file registered as torch-fidelity feature extractors (once per weight hash and process), the
uint8 image dataset torch-fidelity reads, and a cached sha256 of files.
"""
from __future__ import annotations

import io
import os
import threading
import warnings

import torch

from harness.base.digest import file_sha256
from harness.core.metrics.common import MetricsError, _u8_to_float
from harness.core.metrics.extractor import FEATURE_LAYER, INCEPTION_URL, DomainNet

_REGISTERED: dict[str, type] = {}
_REGISTER_LOCK = threading.Lock()


def _fidelity():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_fidelity
    return torch_fidelity


def _make_extractor_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class HarnessDomainExtractor(FeatureExtractorBase):
        """The harness's domain classifier as a torch-fidelity extractor (uint8 NCHW in).

        Subclassed once per weight hash: torch-fidelity instantiates the registered class with
        ``cls(name, features_list, **kwargs)``, so the weights live on the class.
        """
        _arch: dict = {}
        _state: dict = {}

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = DomainNet(**self._arch)
            self.net.load_state_dict(self._state)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return FEATURE_LAYER, "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": FEATURE_LAYER, "kid": FEATURE_LAYER,
                    "prc": FEATURE_LAYER}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4,
                    "Expecting uint8 NCHW images")
            f, logits = self.net.features(_u8_to_float(x))
            out = {FEATURE_LAYER: f, "logits": logits}
            return tuple(out[k] for k in self.features_list)

    return HarnessDomainExtractor


def register_extractor(dataset_name: str, weights: str, arch: dict, state_dict: dict) -> str:
    """Register the classifier with torch-fidelity (once per process); returns its name."""
    name = f"harness-{dataset_name}-{weights}"
    with _REGISTER_LOCK:
        if name in _REGISTERED:
            return name
        _fidelity()
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

        if name in FEATURE_EXTRACTORS_REGISTRY:  # e.g. this module re-imported: same name, same weights
            cls = FEATURE_EXTRACTORS_REGISTRY[name]
        else:
            base = _make_extractor_base()
            cls = type(f"HarnessDomainExtractor_{weights}", (base,),
                       {"_arch": dict(arch), "_state": dict(state_dict)})
            register_feature_extractor(name, cls)
        _REGISTERED[name] = cls
    return name


INCEPTION_MAX_BYTES = 256 << 20  # the pt_inception-2015-12-05 file is 91 MB


def load_inception_weights(path: str) -> dict:
    """The Inception weights file as a dict of tensors, read by the harness itself with
    ``torch.load(weights_only=True)`` (tensors and plain containers only: a pickle that names any
    other global is refused, so the file runs no code). torch-fidelity would read the path with
    ``weights_only=False``; it is handed these tensors instead (:func:`register_inception`)."""
    fix = (f"Use the pt_inception-2015-12-05 weights file ({INCEPTION_URL}) as "
           f"eval.inception_weights.")
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > INCEPTION_MAX_BYTES:
            raise ValueError(f"not a regular file of at most {INCEPTION_MAX_BYTES >> 20} MB")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a foreign file
        raise MetricsError(f"inception_weights {path!r} is not a plain weights file "
                           f"({type(e).__name__}: {str(e)[:200]}). {fix}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise MetricsError(f"inception_weights {path!r} does not hold a state dict of tensors. "
                           f"{fix}")
    return state


def register_inception(weights: str, state_dict: dict) -> str:
    """Register torch-fidelity's InceptionV3 with these tensors (once per weight hash); returns
    its name. The library's constructor reads its weights with ``torch.load``: it is given a
    buffer the harness serialized from the tensors above, never the user's file."""
    name = f"harness-inception-v3-compat-{weights}"
    with _REGISTER_LOCK:
        if name in _REGISTERED:
            return name
        _fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

        if name in FEATURE_EXTRACTORS_REGISTRY:
            cls = FEATURE_EXTRACTORS_REGISTRY[name]
        else:
            def __init__(self, name, features_list, **kwargs):
                buf = io.BytesIO()
                torch.save(dict(self._state), buf)
                buf.seek(0)
                kwargs["feature_extractor_weights_path"] = buf
                FeatureExtractorInceptionV3.__init__(self, name, features_list, **kwargs)

            cls = type(f"HarnessInception_{weights}", (FeatureExtractorInceptionV3,),
                       {"_state": dict(state_dict), "__init__": __init__})
            register_feature_extractor(name, cls)
        _REGISTERED[name] = cls
    return name


class _U8Images(torch.utils.data.Dataset):
    """uint8 NCHW tensor as a torch-fidelity input; 1-channel images repeated to RGB if asked."""

    def __init__(self, u8: torch.Tensor, rgb: bool = False):
        self.u8 = u8.contiguous()
        self.rgb = rgb and u8.shape[1] == 1

    def __len__(self):
        return self.u8.shape[0]

    def __getitem__(self, i):
        x = self.u8[i]
        return x.expand(3, -1, -1) if self.rgb else x


def _file_hash(path: str) -> str:
    return file_sha256(path, memo=True)[:8]
