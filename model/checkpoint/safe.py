"""Reading pickled checkpoints without running code from them.

A ``.pt``/``.ckpt`` file is a pickle, and a pickle names Python callables (its *globals*)
that the loader imports and calls: a crafted file can name ``os.system``. Here every file
goes through a restricted unpickler that resolves only the globals of an allowlist:

- ``RELEASE``: tensors, plain containers and the OmegaConf config the MDLM release's
  Lightning ``.ckpt`` files pickle. Read *leniently*: any other global (the release's
  pickled tokenizer, a crafted payload) is never imported nor called; it becomes an inert
  ``Refused`` placeholder that records its arguments and state, and the load reports
  them in one line. Code that needs a value (weights, EMA, config) refuses a placeholder.
- ``OURS``: exactly what this project's run checkpoints hold (tensors, the Python and
  numpy RNG states, the EMA, DeepSpeed's model and optimizer states). Read *strictly*:
  any other global stops the load with a ``CheckpointError`` naming it.

``trust=True`` (``eval.trust_checkpoint`` / ``checkpointing.trust``) loads a file fully,
as plain ``torch.load(weights_only=False)`` does, for files that need more.

Besides ``find_class``, the unpickler refuses ``BUILD`` on a class, function or module:
a pickle may not set attributes of the allowlisted globals themselves.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import logging
import pickle
import types

import torch

from model.errors import UntrustedCheckpointError

log = logging.getLogger(__name__)

_TENSORS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch.nn.parameter.Parameter", "torch.Size", "torch.device",
    "torch.serialization._get_layout",
})
_CONTAINERS = frozenset({
    "builtins.dict", "builtins.list", "builtins.set", "builtins.frozenset",
    "builtins.tuple", "builtins.bytearray", "collections.OrderedDict",
    "collections.defaultdict", "_codecs.encode",  # bytes under pickle protocol 2
})
# The release's Hydra config: OmegaConf's containers, nodes and their metadata.
_OMEGACONF = frozenset({
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "typing.Any",
})
# numpy.random.get_state(): an array of uint32 keys (numpy 2 and numpy 1 module names).
_NUMPY_RNG = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy.ndarray", "numpy.dtype",
})
# DeepSpeed's ZeRO optimizer states: the stage, the loss scaler (static in fp32 runs,
# dynamic in fp16 runs), the fragment map of the flat partitions, and ZeRO-3's flat fp32
# partitions (tensors pickled with their Python attributes).
_DEEPSPEED = frozenset({
    "torch._tensor._rebuild_from_type_v2", "torch.Tensor",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})

RELEASE = _TENSORS | _CONTAINERS | _OMEGACONF
OURS = _TENSORS | _CONTAINERS | _NUMPY_RNG | _DEEPSPEED

LIBRARY_FLAG = "trust=True (eval.trust_checkpoint=True)"
_NO_SETATTR = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


class Refused:
    """An inert stand-in for an object of a global that was not loaded: it records what
    the pickle passed to it (``args``, ``state``, items) and does nothing else."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    add = append

    def __repr__(self):
        return f"<not loaded: {self.global_name}>"


def qualified(module: str, name: str) -> str:
    """``module.name`` with Python 2 names mapped as pickle maps them (``__builtin__``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _torch_dtype(full: str) -> bool:
    module, _, name = full.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def refusal(source, global_name: str, flag: str) -> str:
    return (f"{source} names {global_name}, which a checkpoint load does not import (it "
            f"could run code); if you trust the file, load it fully with {flag}.")


def pickle_module(allow: frozenset, source, flag: str, lenient: bool,
                  refused: list) -> types.ModuleType:
    """A module with the ``Unpickler`` and ``load`` that ``torch.load(pickle_module=...)``
    uses; refused global names are appended to ``refused``."""

    class Unpickler(pickle._Unpickler):  # the Python implementation: BUILD can be guarded
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            full = qualified(module, name)
            if full in allow or _torch_dtype(full):
                return super().find_class(module, name)
            if not lenient:
                raise UntrustedCheckpointError(refusal(source, full, flag), full)
            if full not in refused:
                refused.append(full)
            return type(name.rpartition(".")[2], (Refused,), {"global_name": full})

        def _build(self):
            target = self.stack[-2]
            if isinstance(target, type) and issubclass(target, Refused):
                self.stack.pop()  # state for a class that was not loaded: dropped
                return
            if isinstance(target, _NO_SETATTR):
                target = getattr(target, "__qualname__", type(target).__name__)
                raise UntrustedCheckpointError(
                    refusal(source, f"attributes of {target}", flag), str(target))
            pickle._Unpickler.load_build(self)

        dispatch[pickle.BUILD[0]] = _build

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("model.checkpoint.safe_pickle")
    module.Unpickler, module.load = Unpickler, load
    return module


def load(path, allow: frozenset, *, trust: bool = False, flag: str = LIBRARY_FLAG,
         lenient: bool = False, map_location="cpu", **kwargs):
    """``torch.load`` of ``path`` through the allowlist ``allow`` (a full load when
    ``trust``). Strict: a global outside it raises UntrustedCheckpointError. Lenient:
    returns ``(object, refused global names)``, placeholders in place of those objects."""
    if trust:
        obj = torch.serialization.load(path, map_location=map_location, weights_only=False,
                                       **kwargs)
        return (obj, []) if lenient else obj
    refused: list[str] = []
    module = pickle_module(allow, path, flag, lenient, refused)
    obj = torch.serialization.load(path, map_location=map_location, pickle_module=module,
                                   weights_only=False, **kwargs)
    return (obj, refused) if lenient else obj


def report(path, refused: list[str], flag: str = LIBRARY_FLAG) -> None:
    """One line naming what a lenient load left out."""
    if refused:
        log.warning("%s: left out what a safe load does not import (the weights do not need "
                    "it; %s loads it): %s", path, flag, ", ".join(refused))


def require(value, source, what: str, flag: str = LIBRARY_FLAG):
    """``value`` unless it is a placeholder, which stops the load naming its global."""
    if isinstance(value, Refused):
        raise UntrustedCheckpointError(
            refusal(f"{source} ({what})", value.global_name, flag), value.global_name)
    return value


@contextlib.contextmanager
def restricted_torch_load(allow: frozenset = OURS, trust: bool = False,
                          flag: str = LIBRARY_FLAG):
    """Within the block, ``torch.load`` reads strictly through ``allow`` (unless ``trust``).

    DeepSpeed reads its model and optimizer states with ``torch.load(...,
    weights_only=False)`` from many call sites (its checkpoint engine, the ZeRO optimizers,
    ``zero_to_fp32``) and offers no hook for the unpickler, so for the duration of a
    DeepSpeed load ``torch.load`` itself is replaced by the restricted loader and put back
    afterwards; every file DeepSpeed opens in that window goes through the allowlist.
    """
    if trust:
        yield
        return
    original = torch.load

    def restricted(f, map_location=None, pickle_module=None, *, weights_only=None,
                   **kwargs):
        return load(f, allow, flag=flag, map_location=map_location, **kwargs)

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = original
