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
  of each array the kernel touches, in slots named below (``PARAM``, ``GRAD``,
  ``MASTER_PARAM``, then the optimizer's states). Each tensor
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

import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt._compressed import q8_bytes
from fastopt.triton_kernels.elementwise import GradTransform, q8_scales_ptr
from fastopt.triton_kernels.interpreter import device_fn, interpreting

# Elements per program. 8192 fp32 AdamW elements move ~224 KB per program:
# long enough to amortise the per-program table reads, short enough that a
# group of small tensors still spreads over all SMs.
CHUNK = tl.constexpr(8192)
# Elements per inner iteration; with 8 warps that is 4 per thread: one 128-bit
# access per fp32 array (64-bit per bf16/fp16 array). Four warps with 8 per
# thread doubled the register count (up to ~200 with fp32 masters and the
# integer RNE code, limiting occupancy) and made ptxas spill a word in some
# Lion specialisations; at 8 warps every specialisation compiles spill-free.
COMPILED_BLOCK = 1024
NUM_WARPS = 8
# NOTE [interpreter block size]
# Under TRITON_INTERPRET=1 each block operation has a large fixed cost, so the
# kernels run with 4096-element blocks there: still two iterations per full
# chunk (the loop is exercised) at a quarter of the operations. BLOCK is a
# pure tiling constant (any power of two dividing CHUNK computes the same
# values); the compiled GPU specialisations, checked ahead of time by
# tests/test_triton_aot.py, use COMPILED_BLOCK.
INTERPRET_BLOCK = 4096
BLOCK = tl.constexpr(INTERPRET_BLOCK if interpreting() else COMPILED_BLOCK)
# Options of every launch (and of the ahead-of-time compiles): no implicit
# fp contraction, so the only fused multiply-adds are the explicit ones of
# NOTE [one formula per quantity] (csrc/include/fastopt/update_math.h).
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

# The storage dtypes the kernels take, and their Triton names.
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.uint8: tl.uint8}  # uint8: 8-bit moments (NOTE [int8 moments])

# Row layout of the tensor table (int64 words): numel, the address of the
# tensor's step scalar (0 for Lion), then one address per array.
ROW_NUMEL = tl.constexpr(0)
ROW_STEP = tl.constexpr(1)
ROW_ARRAYS = tl.constexpr(2)  # array slot k lives at ROW_ARRAYS + k
ROW_WIDTH = tl.constexpr(8)  # room for numel, step and six arrays (AdamW, AdEMAMix)
# Array slots every update kernel shares; its optimizer states follow from
# FIRST_STATE in the order its launcher lists them.
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
MASTER_PARAM = tl.constexpr(2)  # the param's own address again without master weights
FIRST_STATE = tl.constexpr(3)

# The MASTER constexpr of the update kernels: where the weight lives
# (update_math.h's Master).
NO_MASTER = tl.constexpr(0)
FP32_MASTER = tl.constexpr(1)
REMAINDER = tl.constexpr(2)  # bf16 param + int16 remainder (NOTE [master remainder])

_ALIGN_BYTES = 16
_CACHE_SIZE = 64

# ---- device side: the table walk and the chunk loop every kernel shares -------


def kernel(fn):
    """``triton.jit`` for a fastopt kernel. No pointer or tuple argument is specialised
    on its alignment: the arrays' alignment is the ALIGNED constexpr (the pointers
    passed are only tables and scalars), so the specialisations are exactly
    those ``aot.specialisations`` lists. Scalars carry type annotations."""
    names = [
        name
        for name, param in inspect.signature(fn).parameters.items()
        if param.annotation is inspect.Parameter.empty
    ]
    return triton.jit(fn, do_not_specialize_on_alignment=names)


@device_fn
def locate_chunk(chunks_ptr, rows_ptr):
    """This program's chunk: (its tensor's row, the chunk's first element, the tensor's numel)."""
    entry = tl.load(chunks_ptr + tl.program_id(0))
    row = rows_ptr + (entry >> 32) * ROW_WIDTH
    start = (entry & 0xFFFFFFFF) * CHUNK  # int64: tensors beyond 2^31 elements
    return row, start, tl.load(row + ROW_NUMEL)


@device_fn
def array_ptr(row, SLOT: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Array ``SLOT`` of a tensor row as a typed pointer, marked 16-byte aligned when
    the group is (the hint 128-bit accesses need, NOTE [triton multi-tensor])."""
    ptr = tl.load(row + ROW_ARRAYS + SLOT).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_fn
def moment_ptrs(row, SLOT: tl.constexpr, S_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, n):
    """A moment array of a tensor row and, for 8-bit moments (uint8, NOTE [int8
    moments]), the pointer to its fp32 block scales (else the array again, unused)."""
    ptr = array_ptr(row, SLOT, S_DTYPE, ALIGNED)
    if S_DTYPE == tl.uint8:
        scales = q8_scales_ptr(ptr, n)
    else:
        scales = ptr
    return ptr, scales


@device_fn
def update_prologue(
    chunks_ptr,
    rows_ptr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    MASTER: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """What every update program does first: ``(row, start, n, (p_ptr, g_ptr, w_ptr))``,
    its chunk (``locate_chunk``) and its tensor's param, grad and weight pointers.
    ``w_ptr`` is the fp32 master (MASTER == FP32_MASTER), the int16 remainder
    (MASTER == REMAINDER, NOTE [master remainder]) or the param itself."""
    row, start, n = locate_chunk(chunks_ptr, rows_ptr)
    p_ptr = array_ptr(row, PARAM, P_DTYPE, ALIGNED)
    g_ptr = array_ptr(row, GRAD, G_DTYPE, ALIGNED)
    W_DTYPE: tl.constexpr = tl.int16 if MASTER == REMAINDER else tl.float32
    w_ptr = array_ptr(row, MASTER_PARAM, W_DTYPE, ALIGNED) if MASTER else p_ptr
    return row, start, n, (p_ptr, g_ptr, w_ptr)


@device_fn
def step_count(row):
    """The tensor's step ``t`` (its float32 ``step`` state, read on the device) in fp64."""
    return tl.load(tl.load(row + ROW_STEP).to(tl.pointer_type(tl.float32))).to(tl.float64)


@device_fn
def for_each_block(BODY: tl.constexpr, args, start, n):
    """Run ``BODY(args, offs, mask)`` over the blocks of one chunk; return the sum of
    what it returns (the norm's squares; the updates return 0).

    A full chunk loops a constant trip count under an all-true constant mask,
    which the compiler drops (unmasked accesses can be 128-bit vectors); a
    tensor's last chunk is masked and loops only over what it holds. ``BODY``
    is a ``device_fn``; compiled, it inlines into both loops.
    """
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if start + CHUNK <= n:
        for block_start in range(start, start + CHUNK, BLOCK):
            offs = block_start + tl.arange(0, BLOCK).to(tl.int64)
            acc += BODY(args, offs, tl.full([BLOCK], 1, tl.int1))
    else:
        for block_start in range(start, n, BLOCK):
            offs = block_start + tl.arange(0, BLOCK).to(tl.int64)
            acc += BODY(args, offs, offs < n)
    return acc


# ---- host side: the chunk list, the cached tables, the shared arguments -------


def chunk_entries(numels: list[int], chunk: int = CHUNK.value) -> Tensor:
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


def decode_chunk(entry: int, chunk: int = CHUNK.value) -> tuple[int, int]:
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


def _build(device: torch.device, numels, steps, arrays) -> LaunchTable:
    n_tensors = len(numels)
    entries = chunk_entries(numels)
    n_chunks = entries.numel()
    # Pad the chunk list to an even length so the rows view starts 16-byte aligned.
    chunk_words = n_chunks + (n_chunks & 1)
    pin = device.type == "cuda"
    host = torch.zeros(chunk_words + n_tensors * ROW_WIDTH.value, dtype=torch.int64, pin_memory=pin)
    host[:n_chunks] = entries
    rows = host[chunk_words:].view(n_tensors, ROW_WIDTH.value)
    rows[:, ROW_NUMEL.value] = torch.tensor(numels, dtype=torch.int64)
    rows[:, ROW_STEP.value] = torch.tensor(steps, dtype=torch.int64)
    for k, addrs in enumerate(arrays):
        rows[:, ROW_ARRAYS.value + k] = torch.tensor(addrs, dtype=torch.int64)
    aligned = all(a % _ALIGN_BYTES == 0 for addrs in arrays for a in addrs)
    table = host.to(device, non_blocking=True) if device.type != "cpu" else host
    return LaunchTable(
        chunks=table[:chunk_words],
        rows=table[chunk_words:].view(n_tensors, ROW_WIDTH.value),
        n_chunks=n_chunks,
        aligned=aligned,
        host=host,
    )


def _check(arrays: list[list[Tensor]], dtypes: list[torch.dtype], steps) -> None:
    # Once per table (a miss), never on the cached path: the kernels address
    # raw memory, so every tensor must be a dense block of its list's dtype on
    # one device, sized like its parameter.
    first = arrays[0]
    device = first[0].device
    for k, (lst, dtype) in enumerate(zip(arrays, dtypes, strict=True)):
        if len(lst) != len(first):
            raise ValueError("fastopt triton backend: tensor lists must match in length")
        for t, p in zip(lst, first, strict=True):
            # an 8-bit moment holds codes and scales (NOTE [int8 moments])
            size = q8_bytes(p.numel()) if dtype == torch.uint8 else p.numel()
            if t.numel() != size or t.device != device or not t.is_contiguous():
                raise ValueError(
                    "fastopt triton backend: tensors must be contiguous, on one device and "
                    f"match their parameter's size (got {tuple(t.shape)} on {t.device})"
                )
            if t.dtype != dtype:
                what = "gradient" if k == GRAD.value else f"array {k}"
                raise ValueError(
                    f"fastopt triton backend: every {what} of one call must be {dtype} "
                    f"(one launch per call), got {t.dtype}"
                )
    if steps and len(steps) != len(first):
        raise ValueError("fastopt triton backend: one step per parameter")
    for s in steps:
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(
                "fastopt triton backend: each `step` must be a float32 scalar tensor on the "
                f"parameters' device {device} (the kernel reads it), got {s.dtype} on {s.device}"
            )


def launch_table(
    arrays: list[list[Tensor]], dtypes: list[torch.dtype], steps: list[Tensor] | None = None
) -> LaunchTable:
    """The (cached) launch table for parallel lists of same-sized tensors.

    ``arrays[k]`` fills slot ``k`` of every row and must hold tensors of
    ``dtypes[k]``; ``arrays[0]`` decides the sizes. ``steps`` (optional) are the
    per-tensor step scalars the kernel reads for bias correction.
    """
    first = arrays[0]
    device = first[0].device
    steps = steps or []
    step_addrs = tuple(map(Tensor.data_ptr, steps)) or (0,) * len(first)
    addrs = tuple(tuple(map(Tensor.data_ptr, lst)) for lst in arrays)
    key = (device, tuple(dtypes), tuple(map(Tensor.numel, first)), step_addrs, addrs)
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        return table
    _check(arrays, dtypes, steps)
    table = _build(device, key[2], step_addrs, addrs)
    _tables[key] = table
    if len(_tables) > _CACHE_SIZE:
        _tables.popitem(last=False)
    return table


def update_table(
    params: list[Tensor],
    grads: list[Tensor],
    master_params: list[Tensor],
    states: list[tuple[list[Tensor], torch.dtype]],
    steps: list[Tensor] | None = None,
) -> LaunchTable:
    """The launch table of an update: slots PARAM, GRAD, MASTER_PARAM, then ``states``
    (``(tensors, dtype)`` pairs) from FIRST_STATE on. Without master weights the
    MASTER_PARAM slot repeats the param's address; the kernel never touches it."""
    arrays = [params, grads, master_params or params] + [lst for lst, _ in states]
    dtypes = [params[0].dtype, grads[0].dtype, (master_params or params)[0].dtype]
    return launch_table(arrays, dtypes + [dtype for _, dtype in states], steps)


def master_kind(params: list[Tensor], master_params: list[Tensor]) -> int:
    """The MASTER constexpr of a call: NO_MASTER, FP32_MASTER or REMAINDER."""
    if not master_params:
        return NO_MASTER.value
    dtype = master_params[0].dtype
    if dtype == torch.float32 and params[0].dtype != torch.float32:
        return FP32_MASTER.value
    if dtype == torch.int16 and params[0].dtype == torch.bfloat16:
        return REMAINDER.value
    raise ValueError(
        f"fastopt triton backend: master_params of {dtype} for {params[0].dtype} params; "
        "expected float32 masters for bf16/fp16 params or int16 remainders for bf16 params"
    )


def moment_dtype(params: list[Tensor], exp_avgs: list[Tensor]) -> torch.dtype:
    """The moments' storage of a call (the optimizer's state_dtype): float32, bfloat16,
    the params' dtype or uint8 (8-bit); every moment list of the call must have it
    (checked on a miss)."""
    dtype = exp_avgs[0].dtype
    if dtype not in (torch.float32, torch.bfloat16, params[0].dtype, torch.uint8):
        raise ValueError(
            f"fastopt triton backend: moments of {dtype} for {params[0].dtype} params; "
            "expected float32, bfloat16, the params' dtype or uint8 (8-bit moments)"
        )
    return dtype


_constants: dict[tuple, Tensor] = {}


def device_scalar(value: float, device: torch.device, dtype=torch.float32) -> Tensor:
    """A cached 0-dim tensor on ``device`` (stands in for an absent grad_mul, say)."""
    key = (value, device, dtype)
    t = _constants.get(key)
    if t is None:
        t = _constants[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def scalar_tensor(x: Tensor | None, default: float, device: torch.device) -> Tensor:
    """``x`` as a float32 0-dim tensor on ``device`` (a device op at most, never a sync)."""
    if x is None:
        return device_scalar(default, device)
    return x.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def grad_transform(
    device: torch.device,
    grad_mul: Tensor | None,
    max_grad_value: float | None,
    clip_coef: Tensor | None = None,
    maximize: bool = False,
) -> GradTransform:
    """The kernels' GradTransform argument (NOTE [gradient transform]); no sync."""
    return GradTransform(
        grad_mul_ptr=scalar_tensor(grad_mul, 1.0, device),
        grad_sign=-1.0 if maximize else 1.0,
        max_grad_value=math.inf if max_grad_value is None else float(max_grad_value),
        clip_coef_ptr=scalar_tensor(clip_coef, 1.0, device),
    )


def update_args(
    device: torch.device, lr, lr_tensor, maximize, grad_mul, max_grad_value, clip_coef, skip
) -> dict:
    """The kernel arguments every update launch shares, by kernel parameter name.

    The kernel forms lr = ``lr * *lr_ptr`` in fp64 (a float lr times 1.0, or
    1.0 times a device-side lr_tensor) and reads the gradient transform's
    scalars and the skip flag on the device; nothing here synchronises.
    """
    return dict(
        lr=1.0 if lr_tensor is not None else float(lr),
        lr_ptr=scalar_tensor(lr_tensor, 1.0, device),
        transform=grad_transform(device, grad_mul, max_grad_value, clip_coef, maximize),
        skip_ptr=scalar_tensor(skip, 0.0, device),
    )


def launch(kernel, table: LaunchTable, **args) -> None:
    """One launch of ``kernel`` over ``table``: one program per chunk (none if empty)."""
    if table.n_chunks:
        kernel[(table.n_chunks,)](
            table.chunks, table.rows, **args, ALIGNED=table.aligned, **LAUNCH_OPTIONS
        )


def clear_cache() -> None:
    """Drop every cached launch table (tests use this to count table builds)."""
    _tables.clear()
