"""The multi-tensor launch table shared by every Triton kernel of fastopt.

NOTE [triton multi-tensor]
A step over a (device, dtype) group is ONE update launch (and at most one norm
launch), however many tensors the group holds. We use cached device tables of
pointers, not flat buffers:

* Flat buffers would need the parameters, gradients and states to live in one
  allocation each. Gradients are allocated by autograd, one tensor per
  parameter, so a flat gradient buffer means a gather copy every step (an
  extra read and write of every gradient), which is exactly the traffic this
  package exists to remove (SPEC §5).
* A pointer table costs nothing per element. For each tensor it holds one row
  of int64s: ``numel``, the address of its ``step`` scalar, then the address
  of each array the kernel touches (param, grad, moments, master). Each tensor
  is cut into chunks of ``CHUNK`` elements and a chunk list of int64 entries
  ``(tensor index << 32) | chunk index within the tensor`` maps every program
  id of a 1-D grid to its chunk. A program loads its entry, then its tensor's
  row, casts the addresses to typed pointers (``int64.to(tl.pointer_type)``,
  which works in the interpreter and in compiled code), and streams its chunk.
* The table depends only on host metadata (``data_ptr()``, ``numel()``,
  dtype), never on tensor values, so building it never synchronises. It is
  cached under exactly that metadata: a hit is always correct (the table
  content is a function of its key), and a training loop hits every step
  because parameters, states and (with ``zero_grad(set_to_none=False)`` or
  the caching allocator's reuse) gradients keep their addresses. A miss costs
  one host-side build and one asynchronous host->device copy from pinned
  memory.
* Element offsets are int64 (chunk index * CHUNK is computed in int64), so a
  tensor of 2^31 elements or more is addressed correctly; the chunk index
  itself fits 32 bits for any tensor below 2^31 * CHUNK elements.
* When every address is 16-byte aligned (always, for tensors that start their
  storage) the kernels tell the compiler so (``tl.multiple_of`` on the cast
  pointer) and chunks without a tail use unmasked accesses; both are needed
  for 128-bit vector loads. A group with any misaligned tensor launches the
  ALIGNED=False specialisation instead.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per program. 8192 fp32 AdamW elements move ~224 KB per program:
# long enough to amortise the per-program table reads, short enough that a
# group of small tensors still spreads over all SMs.
CHUNK = 8192
# Elements per inner iteration; with 8 warps that is 4 per thread: one 128-bit
# access per fp32 array (64-bit per bf16/fp16 array). Four warps with 8 per
# thread doubled the register count (up to ~200 with fp32 masters and the
# integer RNE code, limiting occupancy) and made ptxas spill a word in some
# Lion specialisations; at 8 warps every specialisation compiles spill-free.
BLOCK = 1024
NUM_WARPS = 8

# NOTE [interpreter block size]
# Under TRITON_INTERPRET=1 each block operation is a numpy call with a large
# fixed cost, so the kernels run with 4096-element blocks there: still two
# iterations per full chunk (the loop is exercised) at a quarter of the calls.
# BLOCK is a pure tiling constexpr (any power of two dividing CHUNK computes
# the same values); the compiled GPU specialisations, checked ahead of time by
# tests/test_triton_aot.py, use BLOCK.
INTERPRET_BLOCK = 4096


def block_size() -> int:
    """BLOCK for compiled kernels, INTERPRET_BLOCK under the interpreter."""
    return INTERPRET_BLOCK if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else BLOCK


# Row layout of the tensor table (int64 words).
ROW_NUMEL = 0
ROW_STEP = 1
ROW_ARRAYS = 2  # first array address; array k lives at ROW_ARRAYS + k
ROW_WIDTH = 8  # room for numel, step and up to six arrays

_ALIGN_BYTES = 16
_CACHE_SIZE = 64

# ---- device side: the table walk every kernel starts with --------------------
# NOTE [interpreter cost of jit calls] (adamw.py) applies: these are called once
# per program (locate_chunk, array_ptr) or once per block (block_offsets), never
# per element. Compiled, they inline: the PTX is the same as with the code
# written out in each kernel.


@triton.jit
def locate_chunk(chunks_ptr, rows_ptr, ROW_WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """This program's chunk: (its tensor's row, the chunk's first element, the tensor's numel)."""
    entry = tl.load(chunks_ptr + tl.program_id(0))
    row = rows_ptr + (entry >> 32) * ROW_WIDTH
    start = (entry & 0xFFFFFFFF) * CHUNK  # int64: tensors beyond 2^31 elements
    n = tl.load(row + 0)  # ROW_NUMEL
    return row, start, n


@triton.jit
def array_ptr(row, K: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Array ``K`` of a tensor row as a typed pointer, marked 16-byte aligned when
    the group is (the hint 128-bit accesses need, NOTE [triton multi-tensor])."""
    ptr = tl.load(row + 2 + K).to(tl.pointer_type(DTYPE))  # ROW_ARRAYS + K
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def block_offsets(block_start, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Element offsets of one block and their mask: ``offs < n`` for a tensor's last
    chunk, an all-true constant (which the compiler drops) for a full one."""
    offs = block_start + tl.arange(0, BLOCK).to(tl.int64)
    if MASKED:
        mask = offs < n
    else:
        mask = tl.full([BLOCK], 1, tl.int1)
    return offs, mask


def chunk_entries(numels: list[int], chunk: int = CHUNK) -> Tensor:
    """The chunk list for tensors of sizes ``numels``: one int64 per program.

    Entry ``(t << 32) | c`` is chunk ``c`` of tensor ``t`` and covers elements
    ``[c * chunk, min((c + 1) * chunk, numels[t]))``. Empty tensors get no
    entry. Built from sizes alone, so it can be checked for tensors too large
    to allocate.
    """
    per_tensor = []
    for t, n in enumerate(numels):
        n_chunks = -(-n // chunk)
        if n_chunks >= 2**31:
            raise ValueError(f"tensor {t} has {n} elements, more than this chunk table can index")
        if n_chunks:
            per_tensor.append((t << 32) + torch.arange(n_chunks, dtype=torch.int64))
    if not per_tensor:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(per_tensor)


def decode_chunk(entry: int, chunk: int = CHUNK) -> tuple[int, int]:
    """(tensor index, first element offset) of a chunk entry, as the kernels compute it."""
    return entry >> 32, (entry & 0xFFFFFFFF) * chunk


@dataclass
class LaunchTable:
    """Device-resident chunk list and tensor rows for one launch."""

    chunks: Tensor  # int64 [n_chunks]
    rows: Tensor  # int64 [n_tensors, ROW_WIDTH]
    n_chunks: int
    aligned: bool
    host: Tensor  # the (pinned) host copy, kept alive until the async copy has run


_tables: OrderedDict[tuple, LaunchTable] = OrderedDict()


def _build(device: torch.device, numels: list[int], steps: list[int], arrays: list[list[int]]):
    n_tensors = len(numels)
    entries = chunk_entries(numels)
    n_chunks = entries.numel()
    # Pad the chunk list to an even length so the rows view starts 16-byte aligned.
    chunk_words = n_chunks + (n_chunks & 1)
    pin = device.type == "cuda"
    host = torch.zeros(chunk_words + n_tensors * ROW_WIDTH, dtype=torch.int64, pin_memory=pin)
    host[:n_chunks] = entries
    rows = host[chunk_words:].view(n_tensors, ROW_WIDTH)
    rows[:, ROW_NUMEL] = torch.tensor(numels, dtype=torch.int64)
    rows[:, ROW_STEP] = torch.tensor(steps, dtype=torch.int64)
    for k, addrs in enumerate(arrays):
        rows[:, ROW_ARRAYS + k] = torch.tensor(addrs, dtype=torch.int64)
    aligned = all(a % _ALIGN_BYTES == 0 for addrs in arrays for a in addrs)
    table = host.to(device, non_blocking=True) if device.type != "cpu" else host
    return LaunchTable(
        chunks=table[:chunk_words],
        rows=table[chunk_words:].view(n_tensors, ROW_WIDTH),
        n_chunks=n_chunks,
        aligned=aligned,
        host=host,
    )


def launch_table(arrays: list[list[Tensor]], steps: list[Tensor] | None = None) -> LaunchTable:
    """The (cached) launch table for parallel lists of same-sized tensors.

    ``arrays[0]`` decides the sizes; every list must have one tensor per entry
    with the same number of elements. ``steps`` (optional) are the per-tensor
    step scalars the kernel reads for bias correction.
    """
    first = arrays[0]
    device = first[0].device
    numels = [t.numel() for t in first]
    addrs = [[t.data_ptr() for t in lst] for lst in arrays]
    step_addrs = [s.data_ptr() for s in steps] if steps is not None else [0] * len(first)
    key = (device, tuple(numels), tuple(step_addrs), tuple(tuple(a) for a in addrs))
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        return table
    # Checked once per table (a miss), never on the cached path: the kernels
    # address raw memory, so every tensor must be a dense block on this device.
    for lst in arrays:
        if len(lst) != len(first):
            raise ValueError("fastopt triton backend: tensor lists must match in length")
        for t, n in zip(lst, numels, strict=True):
            if t.numel() != n or t.device != device or not t.is_contiguous():
                raise ValueError(
                    "fastopt triton backend: tensors must be contiguous, on one device and "
                    f"match their parameter's size (got {tuple(t.shape)} on {t.device})"
                )
    for s in steps or ():
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(
                "fastopt triton backend: each `step` must be a float32 scalar tensor on the "
                f"parameters' device {device} (the kernel reads it), got {s.dtype} on {s.device}"
            )
    table = _build(device, numels, step_addrs, addrs)
    _tables[key] = table
    if len(_tables) > _CACHE_SIZE:
        _tables.popitem(last=False)
    return table


_constants: dict[tuple, Tensor] = {}


def device_scalar(value: float, device: torch.device, dtype=torch.float32) -> Tensor:
    """A cached 0-dim tensor on ``device`` (stands in for an absent grad_scale, say)."""
    key = (value, device, dtype)
    t = _constants.get(key)
    if t is None:
        t = _constants[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def scalar_tensor(x: Tensor | None, default: float, device: torch.device, dtype=torch.float32):
    """``x`` as a 0-dim ``dtype`` tensor on ``device`` (a device op at most, never a sync)."""
    if x is None:
        return device_scalar(default, device, dtype)
    return x.detach().reshape(()).to(device=device, dtype=dtype, non_blocking=True)


def split_double(x: float) -> tuple[float, float]:
    """``x`` as two fp32 values whose sum, formed in fp64 in the kernel, is x to ~2^-48.

    NOTE [double scalars through fp32 arguments]
    Triton passes Python floats as fp32, but the reference computes the
    per-tensor coefficients (1 - lr*wd, lr / (1 - beta1^t), sqrt(1 - beta2^t))
    on Python doubles and rounds each once to fp32. Rounding lr or beta to fp32
    first moves those coefficients by up to an fp32 ulp, enough to flip the
    rounding of bf16/fp16 states and let runs drift apart by several ulps over
    a few steps. hi + lo carries the double through; the kernel rebuilds it in
    fp64 and rounds each coefficient once, like the reference.
    """
    hi = struct.unpack("f", struct.pack("f", x))[0] if math.isfinite(x) else x
    lo = x - hi if math.isfinite(x) else 0.0
    return hi, lo


def update_scalars(
    device: torch.device, lr: float | Tensor, grad_scale: Tensor | None, found_inf: Tensor | None
) -> tuple[tuple[float, float, Tensor], Tensor, Tensor]:
    """The scalar launch arguments every update kernel takes, built without a sync.

    Returns ``((lr_hi, lr_lo, lr_ptr), grad_mul, found)``: the kernel forms
    lr = (lr_hi + lr_lo) * *lr_ptr in fp64, so a Python lr travels split in two
    (NOTE [double scalars through fp32 arguments]) with lr_ptr -> 1.0, and a
    tensor lr travels as 1.0 + 0.0 times its fp64 value read on the device.
    """
    if isinstance(lr, Tensor):
        lr_args = (1.0, 0.0, scalar_tensor(lr, 1.0, device, torch.float64))
    else:
        lr_args = (*split_double(float(lr)), device_scalar(1.0, device, torch.float64))
    grad_mul = scalar_tensor(grad_scale, 1.0, device)
    found = scalar_tensor(found_inf, 0.0, device)
    return lr_args, grad_mul, found


def by_grad_dtype(grads: list[Tensor]) -> Iterator[tuple[torch.dtype, Callable[[list], list]]]:
    """One ``(grad dtype, pick)`` per gradient dtype present, in first-seen order.

    ``pick(lst)`` selects that group's entries from any list parallel to
    ``grads`` (the list itself when every gradient shares the dtype, so the
    usual single-dtype group keeps its identity and builds no new lists).
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.dtype, []).append(i)
    for g_dtype, idx in groups.items():

        def pick(lst: list, idx: list[int] = idx) -> list:
            return lst if len(idx) == len(lst) else [lst[i] for i in idx]

        yield g_dtype, pick


def clear_cache() -> None:
    """Drop every cached launch table (tests use this to count table builds)."""
    _tables.clear()
