"""Registration of the native models with transformers' Auto classes (no remote code).

After registration ``AutoConfig.from_pretrained(dir)`` returns a :class:`LLaDAConfig` /
:class:`DreamConfig` and ``AutoModel.from_pretrained(dir)`` (or ``AutoModelForCausalLM``)
returns a native :class:`~fair_calib_ext.models.DiffusionLM` via ``load_pretrained``.

Importing transformers' configuration machinery costs ~1.5 s, so :func:`install` does not
import it: if transformers' auto modules are already loaded it registers at once, otherwise
it registers right after they are first imported (a post-import hook on ``sys.meta_path``).
Any failure there is turned into a warning; it never breaks importing this package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from typing import Any, Callable

__all__ = ["install", "register_configs", "register_models", "NativeAutoModel"]

_CONFIG_MOD = "transformers.models.auto.configuration_auto"
_MODEL_MOD = "transformers.models.auto.modeling_auto"
_config_classes: dict[str, type] = {}
_lock = threading.Lock()
_done: set[str] = set()


def _make_config_class(model_type: str, class_name: str, arch: str) -> type:
    from transformers.configuration_utils import PretrainedConfig

    def __init__(self: Any, **kwargs: Any) -> None:
        kwargs.setdefault("architectures", [arch])
        if kwargs.get("rope_scaling", 0) is None:  # Dream writes null; transformers 5 warns on the key
            kwargs.pop("rope_scaling")
        PretrainedConfig.__init__(self, **kwargs)

    return type(
        class_name,
        (PretrainedConfig,),
        {
            "model_type": model_type,
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"transformers config for official {model_type!r} checkpoints (plain JSON fields).",
        },
    )


def register_configs() -> None:
    """AutoConfig.register for "llada" and "Dream" (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from . import dream, llada

    with _lock:
        if "configs" in _done:
            return
        for mod, cname in ((llada, "LLaDAConfig"), (dream, "DreamConfig")):
            cls = _make_config_class(mod.MODEL_TYPE, cname, mod.ARCHITECTURE)
            AutoConfig.register(mod.MODEL_TYPE, cls, exist_ok=True)
            _config_classes[mod.MODEL_TYPE] = cls
            globals()[cname] = cls
        _done.add("configs")


class NativeAutoModel:
    """What the Auto classes dispatch to: loads through :func:`load_pretrained`.

    Not a PreTrainedModel (that import alone costs seconds); it only implements the two
    entry points the Auto classes call.
    """

    config_class: type | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """Native model from a local dir; honours ``dtype``/``torch_dtype`` and ``device_map`` (a device)."""
        import torch

        from .loading import load_pretrained

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype in (None, "auto"):
            dtype = torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = kwargs.get("device_map") or "cpu"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not isinstance(device, (str, torch.device)):
            raise ValueError("device_map must be a single device for native LLaDA/Dream models")
        return load_pretrained(pretrained_model_name_or_path, dtype=dtype, device=device)

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any):
        """Randomly initialised native model from a registered config object."""
        import torch

        from .loading import build_model, parse_official_config

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype")) or torch.float32
        return build_model(parse_official_config(config.to_dict()), dtype=dtype)


def register_models() -> None:
    """AutoModel / AutoModelForCausalLM registration (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    register_configs()
    with _lock:
        if "models" in _done:
            return
        for mt, cls in _config_classes.items():
            proxy = type(f"{cls.__name__[:-6]}NativeModel", (NativeAutoModel,),
                         {"config_class": cls, "__module__": __name__})
            for auto in (AutoModel, AutoModelForCausalLM):
                auto.register(cls, proxy, exist_ok=True)
        _done.add("models")


def _safe(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # registration is a convenience; never break the caller's import
        warnings.warn(f"fair_calib_ext: could not register LLaDA/Dream with transformers: {exc!r}",
                      RuntimeWarning, stacklevel=2)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a callback right after a watched module finishes executing."""

    def __init__(self, callbacks: dict[str, Callable[[], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname not in self.callbacks:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, callback = spec.loader, self.callbacks.pop(fullname)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec):
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                _safe(callback)

            def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Register now if transformers' auto modules are loaded, else right after they are."""
    pending: dict[str, Callable[[], None]] = {}
    if _CONFIG_MOD in sys.modules:
        _safe(register_configs)
    else:
        pending[_CONFIG_MOD] = register_configs
    if _MODEL_MOD in sys.modules:
        _safe(register_models)
    else:
        pending[_MODEL_MOD] = register_models
    if pending and not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(pending))
