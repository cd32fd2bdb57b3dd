"""The one restricted pickle reader: checkpoints are untrusted data, and a pickle is code.

Two ways to read one without running anything from it, each parametrised by the caller's
allowlist (which stays with the caller: what an ultralytics ``.pt`` or a DCP ``.metadata``
may hold is the caller's business, how it is enforced is this module's):

- :func:`scan_pickle` walks a pickle's opcodes on a symbolic stack (nothing is executed)
  and reports every global it names, calls (``REDUCE``) and instantiates (``NEWOBJ``);
  opcodes that call or look up something it cannot vet are refused outright. A caller
  checks the result against its allowlist, then loads with :func:`weights_only_load`
  (torch's weights-only unpickler, widened by exactly that allowlist);
- :class:`RestrictedUnpickler` is a ``pickle.Unpickler`` whose ``find_class`` (the only way
  a pickle reaches a callable) resolves only what ``allowed(module, name)`` admits and
  refuses anything else by name; persistent references are refused.

Standard library only; torch is imported inside :func:`weights_only_load` alone.
"""

from __future__ import annotations

import pickle
import pickletools
import threading
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

ErrorFactory = Callable[[str], BaseException]


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that could run code or build something its reader does not admit."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- the opcode scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class PickleGlobals:
    """What a pickle references: every global, the globals it calls (``REDUCE``) and
    those it instantiates without calling a constructor (``NEWOBJ``)."""

    names: frozenset[str]
    called: frozenset[str]
    instantiated: frozenset[str]


class _Global(str):
    """A global on the simulated stack (its dotted name)."""


class _Str(str):
    """A string constant on the simulated stack (``STACK_GLOBAL`` reads two)."""


_UNKNOWN = object()
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_REFUSED_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # calls or registry lookups we cannot vet


def scan_pickle(
    data: bytes, what: str = "pickle", error: ErrorFactory = UnsafePickle
) -> PickleGlobals:
    """Walk the opcodes of ``data`` on a symbolic stack (nothing is executed): which
    globals it names, which it calls and which it instantiates. A call whose callable
    is not a plain global (computed at load time) is refused outright, as ``error``."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    names: set[str] = set()
    called: set[str] = set()
    instantiated: set[str] = set()

    def pop(n: int = 1) -> list[Any]:
        if n > len(stack):
            raise error(f"{what}: malformed pickle (stack underflow)")
        taken = stack[len(stack) - n :] if n else []
        del stack[len(stack) - n :]
        return taken

    try:
        ops = list(pickletools.genops(data))
    except ValueError as exc:
        raise error(f"{what}: malformed pickle: {exc}") from exc
    for op, arg, _pos in ops:
        name = op.name
        if name in _REFUSED_OPS:
            raise error(f"{what}: refusing pickle opcode {name} (not used by torch.save)")
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            # the protocol-2 names Python 3 maps (``__builtin__.set``), as torch's reader does
            if (module, attr) in NAME_MAPPING:
                module, attr = NAME_MAPPING[(module, attr)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
            full = f"{module}.{attr}"
            names.add(full)
            stack.append(_Global(full))
        elif name == "STACK_GLOBAL":
            module, attr = pop(2)
            if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                raise error(f"{what}: a global whose name is computed at load time")
            full = f"{module}.{attr}"
            names.add(full)
            stack.append(_Global(full))
        elif name in _STRING_OPS:
            stack.append(_Str(arg) if isinstance(arg, str) else _UNKNOWN)
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else _UNKNOWN
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _UNKNOWN
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg), _UNKNOWN))
        elif name == "DUP":
            stack.append(stack[-1] if stack else _UNKNOWN)
        elif name == "REDUCE":
            _args, func = pop(1) + pop(1)
            if not isinstance(func, _Global):
                raise error(f"{what}: calls an object computed at load time")
            called.add(str(func))
            stack.append(_UNKNOWN)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            taken = pop(3 if name == "NEWOBJ_EX" else 2)
            cls = taken[0]
            if not isinstance(cls, _Global):
                raise error(f"{what}: instantiates a class computed at load time")
            instantiated.add(str(cls))
            stack.append(_UNKNOWN)
        else:  # every other opcode: its documented stack effect, values unknown
            before = op.stack_before
            if pickletools.markobject in before:
                if not marks:
                    raise error(f"{what}: malformed pickle (no mark)")
                del stack[marks.pop() :]
                pop(before.index(pickletools.markobject))
            else:
                pop(len(before))
            stack.extend(_UNKNOWN for _ in op.stack_after)
    return PickleGlobals(frozenset(names), frozenset(called), frozenset(instantiated))


def torch_save_pickle(path: str, max_bytes: int, error: ErrorFactory = UnsafePickle) -> bytes:
    """The ``data.pkl`` record ``torch.load`` would unpickle from the ``torch.save`` zip at
    ``path`` (tensors live outside it); legacy, TorchScript and oversized pickles refused."""
    if not zipfile.is_zipfile(path):
        raise error(
            f"{path}: not a torch.save zip archive (legacy or foreign formats are not loaded)"
        )
    with zipfile.ZipFile(path) as archive:
        records = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(records) != 1 or any(n.endswith("constants.pkl") for n in archive.namelist()):
            raise error(f"{path}: not a torch.save checkpoint (a TorchScript archive?)")
        if archive.getinfo(records[0]).file_size > max_bytes:
            raise error(f"{path}: its pickle is over {max_bytes} bytes")
        return archive.read(records[0])


_LOAD_LOCK = threading.Lock()  # torch's safe_globals edits a process-wide set


def weights_only_load(
    data: str | IO[bytes] | Any, *, allow: Iterable[tuple[Any, str]] = (), mmap: bool = False
) -> Any:
    """``torch.load(weights_only=True)`` on CPU, torch's own allowlist widened by exactly
    ``allow`` (``(object, dotted name)`` pairs, as ``torch.serialization.safe_globals``
    takes them) for this call only. A refusal is torch's ``pickle.UnpicklingError``: the
    caller words it (:func:`first_line` is its informative line)."""
    import torch

    with _LOAD_LOCK, torch.serialization.safe_globals(list(allow)):
        return torch.load(data, map_location="cpu", weights_only=True, mmap=mmap or None)


# -- the restricted unpickler -------------------------------------------------------------


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles what ``allowed(module, name)`` admits; any other global is refused as
    ``error`` naming it (``find_class`` is the only way a pickle reaches a callable), and
    so is every persistent reference. ``source`` names the file in the messages."""

    def __init__(
        self,
        file: IO[bytes],
        source: str,
        allowed: Callable[[str, str], bool],
        error: ErrorFactory = UnsafePickle,
    ) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = allowed
        self.error = error

    def find_class(self, module: str, name: str) -> Any:
        if self.allowed(module, name):
            return super().find_class(module, name)
        raise self.error(
            f"{self.source} refers to {module}.{name}, which a checkpoint may not contain; "
            "refusing to load it"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise self.error(f"{self.source} holds a persistent reference; refusing to load it")
