"""
Content fingerprints for the cache keys: what a result depends on, never where its inputs live.

A tokenizer counts by its vocabulary, template and settings, not by the directory it was loaded from or the loading
options (`name_or_path`, `local_files_only`, ...). A callable counts as `datasets` counts a `Dataset.map` function
(its code, defaults and closure, and the globals it reads, hashed with `datasets`' dill-based `Hasher`), and further:
the functions and classes of user code it reaches through its globals (a helper it calls, a module's function it
calls) count by their own code and globals, recursively, where dill would only record their names.
"""

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import inspect
import os
import sys
import sysconfig
import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher


# Where a tokenizer was loaded from and how: not part of what it computes
_TOKENIZER_LOCATION_KEYS = (
    "name_or_path", "is_local", "local_files_only", "cache_dir", "revision", "_commit_hash", "token",
    "force_download", "proxies", "subfolder", "_from_auto", "trust_remote_code", "vocab_file", "merges_file",
    "tokenizer_file", "files_loaded",
)
# Library code (the standard library, installed packages) counts by its name and version, not by its source
_LIBRARY_PATHS = tuple(
    os.path.realpath(path) + os.sep
    for path in {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def tokenizer_fingerprint(tokenizer) -> str:
    """The hash of a tokenizer (or processor) without where and how it was loaded."""
    clone = copy.copy(tokenizer)  # shallow: the backend is shared, and `datasets` hashes it without its runtime state
    state = vars(clone)
    for key in _TOKENIZER_LOCATION_KEYS:
        if key in state:
            state[key] = None  # set rather than removed: the tokenizer's methods read some of them
    if isinstance(state.get("init_kwargs"), dict):
        state["init_kwargs"] = {k: v for k, v in state["init_kwargs"].items() if k not in _TOKENIZER_LOCATION_KEYS}
    return Hasher.hash(clone)


def token_ids_fingerprint(dataset, columns: list[str], batch_size: int = 65536) -> str:
    """
    The hash of the token ids in `columns` of a dataset, in order (its fingerprint says how the dataset was made: from
    which tokenizer, loaded from where; this says only what it holds).
    """
    digest = hashlib.blake2b(repr(columns).encode(), digest_size=16)
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        for column in columns:
            array = batch[column].combine_chunks()
            while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
                digest.update(pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
                array = pc.list_flatten(array)
            digest.update(str(array.type).encode())
            digest.update(array.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


class UnreliableFingerprint(Exception):
    """A callable whose result may depend on something its fingerprint cannot see."""


def callable_fingerprint(func) -> str:
    """
    The hash of what a callable computes: its code and defaults, the values it closes over or is bound to, and the
    globals it reads (functions and classes of user code by their own fingerprint, recursively). Raises
    `UnreliableFingerprint` (saying why) when a value it depends on cannot be hashed.
    """
    return Hasher.hash(_identity(func, {}))


def _identity(value, seen: dict[int, object]):
    """What `value` contributes to a fingerprint. `seen` holds the functions, classes and objects met (kept alive, so
    that their ids stay theirs): met again (recursion), they count by name."""
    if id(value) in seen:
        return ("seen", getattr(value, "__qualname__", type(value).__qualname__))
    if isinstance(value, types.ModuleType):
        return ("module", value.__name__, _version(value.__name__))
    if isinstance(value, (staticmethod, classmethod)):
        return (type(value).__name__, _identity(value.__func__, seen))
    if isinstance(value, property):
        return ("property", *(_identity(f, seen) for f in (value.fget, value.fset, value.fdel) if f is not None))
    if isinstance(value, types.MethodType):
        return ("method", _identity(value.__func__, seen), _identity(value.__self__, seen))
    if isinstance(value, functools.partial):
        return ("partial", _identity(value.func, seen), _hashed(value.args), _hashed(value.keywords))
    is_code = isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type))
    if is_code and _is_library(value):
        return ("library", getattr(value, "__module__", None), value.__qualname__, _version(value.__module__))
    if isinstance(value, types.FunctionType):
        seen[id(value)] = value
        return _function_identity(value, seen)
    if isinstance(value, type):
        seen[id(value)] = value
        members = {
            name: _identity(member, seen) for name, member in sorted(vars(value).items())
            if not name.startswith("__") or isinstance(member, (types.FunctionType, staticmethod, classmethod))
        }
        return ("class", value.__module__, value.__qualname__, members)
    if hasattr(value, "__dict__") and not _is_library(type(value)):
        # An object of a user class (a callable one, a helper): its class's code and its state
        seen[id(value)] = value
        return ("object", _identity(type(value), seen), _hashed(vars(value)))
    return ("value", _hashed(value))


def _function_identity(func: types.FunctionType, seen: dict[int, object]):
    code = func.__code__
    names = _global_names(code)

    def used(value):
        identity = _identity(value, seen)
        if isinstance(value, types.ModuleType) and not _is_library(value):
            # `helpers.score(...)`: the members of the module it may use (`score`), by their own fingerprint
            members = {name: _identity(getattr(value, name), seen) for name in sorted(names) if hasattr(value, name)}
            identity = (identity, members)
        return identity

    globals_used = {}
    for name in sorted(names & func.__globals__.keys()):
        with _context(f"the global {name!r} of {func.__qualname__}"):
            globals_used[name] = used(func.__globals__[name])
    closure = []
    for variable, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
        with _context(f"the variable {variable!r} that {func.__qualname__} closes over"):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: a variable not assigned yet
                closure.append(None)
                continue
            closure.append(used(value))
    return (
        "function", func.__module__, func.__qualname__, _hashed(code), _hashed(func.__defaults__),
        _hashed(func.__kwdefaults__), closure, globals_used,
    )


@contextlib.contextmanager
def _context(where: str):
    """Say where an unhashable value was found."""
    try:
        yield
    except UnreliableFingerprint as error:
        raise UnreliableFingerprint(f"{where}: {error}") from error.__cause__


def _global_names(code: types.CodeType) -> set[str]:
    """Every name a code object and the code objects nested in it (lambdas, comprehensions) may read as a global."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _global_names(constant)
    return names


def _hashed(value) -> str:
    try:
        return Hasher.hash(value)
    except Exception as error:
        raise UnreliableFingerprint(f"a value of type {type(value).__name__} cannot be hashed ({error})") from error


def _is_library(value) -> bool:
    """Whether a module, function or class is the standard library's or an installed package's."""
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    if name == "__main__":  # a script or a notebook
        return False
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    return path is None or os.path.realpath(path).startswith(_LIBRARY_PATHS)  # built in, or installed


@functools.lru_cache(maxsize=None)
def _version(module_name: str | None) -> str | None:
    package = (module_name or "").partition(".")[0]
    try:
        return importlib.metadata.version(package)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
