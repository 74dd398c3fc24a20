"""What a checkpoint would build, read from its pickles' opcodes (pickletools) without unpickling anything: the
bound safe loading (yolo_tq.io) puts on a file before torch.load(weights_only=True) sees it.

torch.save writes a zip archive whose data.pkl creates modules and dataclasses with NEWOBJ (cls.__new__: nothing is
allocated), rebuilds tensors as views of the storages stored beside it, and calls nothing else. A pickle may also
*call* an allowlisted class, which runs its __init__ (torch.nn.Linear(20000, 20000) allocates 1.6 GB), or one of the
constructors torch's own weights_only allowlist holds (torch.FloatTensor(n), bytearray(n)); and a tensor view may
claim any shape over a one-element storage (stride 0), which the first .float() allocates in full. So safe loading
accepts only: a zip archive whose members do not unpack to more bytes than the file holds; classes created, never
called; calls only to SAFE_CALLS, the rebuilders that make no more than the file holds; and at most
MAX_ELEMENTS_PER_BYTE tensor elements per byte of the file.
"""

from __future__ import annotations

import math
import pickletools
import zipfile
from pathlib import Path

# what a checkpoint's pickle may call in safe mode: rebuilders that allocate no more than the file itself holds
SAFE_CALLS = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch.Size", "torch.device", "collections.OrderedDict", "builtins.set", "_codecs.encode",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "ultralytics.utils.IterableSimpleNamespace",
    *(f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath"))})
FORBIDDEN_OPS = ("INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4")  # calls that torch.save never writes
TENSOR_REBUILD = "torch._utils._rebuild_tensor_v2"  # (storage, offset, shape, stride, ...)
# tensor elements a checkpoint may rebuild per byte of its file: torch.save stores each element in one byte or more,
# so only views that overlap (stride 0) can exceed it
MAX_ELEMENTS_PER_BYTE = 1
_MARKS = (pickletools.markobject, pickletools.stackslice)


class Refused(ValueError):
    """What safe loading refuses in a checkpoint, as one line."""


class Damaged(ValueError):
    """An archive that cannot be read (truncated, not a pickle)."""


class _Global(str):
    """A global a pickle names (module.qualname), as the opcode scan sees it."""


def _call(name: str, func, args, classes) -> int:
    """Refused unless `func` may be called (REDUCE) or created (NEWOBJ); the tensor elements the call rebuilds."""
    what = func if isinstance(func, _Global) else "an object it computed"
    if name == "NEWOBJ" and what not in classes:
        raise Refused(f"it creates {what}, which is not a class of this project, Ultralytics or torch.nn")
    if name == "REDUCE" and what not in SAFE_CALLS:
        raise Refused(f"it calls {what}" + (" (a saved model only creates classes, never calls them)"
                                            if what in classes else ", which torch.save never calls"))
    if func != TENSOR_REBUILD:
        return 0
    shape = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise Refused("it rebuilds a tensor without a constant shape")
    return math.prod(shape)


def _global(name: str, arg, popped) -> _Global:
    """The global a GLOBAL or STACK_GLOBAL opcode names, Python 2's __builtin__ read as builtins (as pickle and
    torch read it)."""
    module, qualname = arg.split(" ", 1) if name == "GLOBAL" else (str(popped[0]), str(popped[1]))
    return _Global(f"{'builtins' if module == '__builtin__' else module}.{qualname}")


def scan_pickle(data: bytes, classes) -> int:
    """The tensor elements pickle `data` rebuilds; Refused for what safe loading does not allow (`classes`: the
    names that may be created). A stack of the constants, globals and tuples the opcodes push is followed (lists,
    dicts and objects are not: they cannot be called); nothing is unpickled."""
    stack, marks, memo, elements = [], [], {}, 0
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in FORBIDDEN_OPS:
            raise Refused(f"it uses the pickle opcode {name}, which torch.save never writes")
        if name == "MARK":
            marks.append(len(stack))
        elif name.endswith("GET"):
            stack.append(memo.get(arg))
        elif name.endswith("PUT") or name == "MEMOIZE":
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        else:
            items = ()
            if pickletools.markobject in op.stack_before:
                start = marks.pop()
                items, stack[start:] = tuple(stack[start:]), []
            n = sum(x not in _MARKS for x in op.stack_before)
            popped, stack[len(stack) - n:] = stack[len(stack) - n:], []
            out = arg  # a constant's value; None where the value is not followed
            if name in ("GLOBAL", "STACK_GLOBAL"):
                out = _global(name, arg, popped)
            elif name.startswith(("TUPLE", "EMPTY_TUPLE")):
                out = items if name == "TUPLE" else tuple(popped)
            elif name in ("REDUCE", "NEWOBJ"):
                elements += _call(name, *popped, classes)
                out = None
            stack.extend([out] * len(op.stack_after))
    return elements


def check_archive(path: str | Path, classes) -> None:
    """Refused unless `path` is a torch.save zip archive within the bounds of this module's docstring; Damaged if it
    cannot be read. Nothing is unpickled."""
    path = Path(path)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise Damaged("no zip directory")
        raise Refused("it is not a torch.save archive (a zip file)")
    try:
        with zipfile.ZipFile(path) as z:
            if sum(i.file_size for i in z.infolist()) > size:
                raise Refused("its members unpack to more bytes than the file holds")
            elements = sum(scan_pickle(z.read(i), classes) for i in z.infolist() if i.filename.endswith(".pkl"))
    except Refused:
        raise
    except (zipfile.BadZipFile, ValueError, IndexError, KeyError, EOFError, OSError) as e:
        raise Damaged(type(e).__name__) from e
    if elements > MAX_ELEMENTS_PER_BYTE * size:
        raise Refused(f"its tensors would hold {elements:,} elements, more than its {size:,} bytes store "
                      f"(at most {MAX_ELEMENTS_PER_BYTE} per byte)")
