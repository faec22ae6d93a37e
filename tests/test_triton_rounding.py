"""The kernels' conversions and rounding, bit for bit: NOTE [explicit RNE in Triton] (narrowing
equals torch's rounding), exact widening, and NOTE [fma under the interpreter].

torch's ``Tensor.to(bfloat16/float16)`` rounds to nearest even (c10), which is
what a GPU's ``cvt.rn`` does; the Triton interpreter's own fp32->bf16 cast
truncates. These tests run ``narrow`` under the interpreter over every class
of input: random bit patterns, exact ties, the fp16 subnormal range, the
overflow boundary, infinities and NaNs.
"""

import pytest
import torch
import triton
import triton.language as tl

from fastopt.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"
)

narrow = triton_backend.kernels().rounding.narrow if triton_backend.unavailable() is None else None


@triton.jit
def _narrow_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, narrow(tl.load(x_ptr + offs, mask=mask), DTYPE), mask=mask)


def run_narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    block = 1 << 16
    _narrow_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), DTYPE=tl_dtype, BLOCK=block)
    return y


def from_bits(bits) -> torch.Tensor:
    return torch.as_tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def interesting_inputs(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (100_000,), generator=gen, dtype=torch.int64)
    # Every storage value's exact fp32 image, the midpoints to both neighbours
    # (ties) and one fp32 ulp either side of each midpoint.
    all_storage = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = all_storage[torch.isfinite(all_storage)]
    nxt = torch.nextafter(finite.to(dtype).float(), torch.tensor(float("inf")))
    up = finite.to(dtype)
    up_next = (
        (up.view(torch.int16) + torch.where(up >= 0, 1, -1).to(torch.int16)).view(dtype).float()
    )
    mid = (finite.double() + up_next.double()) / 2
    mid = mid[torch.isfinite(mid)].float()
    ties = torch.cat(
        [
            mid,
            torch.nextafter(mid, torch.tensor(float("inf"))),
            torch.nextafter(mid, torch.tensor(-float("inf"))),
        ]
    )
    # fp16 subnormal range and below, densely; the overflow boundary.
    tiny = torch.linspace(0, 2.0**-13, 20_001)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, 65536.0,
                            3.3895e38, 3.4028e38, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-126, 1e-45])  # fmt: skip
    nan_payloads = from_bits([0x7F800001, 0x7FC00000, 0xFF800001, 0x7FFFFFFF, 0x7F802000])
    return torch.cat([random_bits.to(torch.int32).view(torch.float32), finite, nxt, ties,
                      tiny, -tiny, special, -special, nan_payloads])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_matches_torch_rne(dtype):
    x = interesting_inputs(dtype)
    got = run_narrow(x, dtype)
    want = x.to(dtype)
    same_bits = got.view(torch.int16) == want.view(torch.int16)
    both_nan = got.isnan() & want.isnan()
    bad = ~(same_bits | both_nan)
    assert not bad.any(), (
        f"{int(bad.sum())} mismatches, e.g. {x[bad][:5].tolist()} -> {got[bad][:5].tolist()} vs {want[bad][:5].tolist()}"
    )
    # NaN stays NaN and keeps its sign.
    nan = x.isnan()
    assert got[nan].isnan().all()
    assert torch.equal(torch.signbit(got[nan].float()), torch.signbit(x[nan]))


# ---- NOTE [fma under the interpreter] ------------------------------------------------------


def exact_fma_f32(a: float, b: float, c: float) -> float:
    """a * b + c rounded once to fp32, by exact rational arithmetic."""
    from fractions import Fraction

    v = Fraction(a) * Fraction(b) + Fraction(c)
    f = torch.tensor(float(v), dtype=torch.float32)  # within an fp32 ulp of the answer
    down = torch.nextafter(f, torch.tensor(-float("inf")))
    up = torch.nextafter(f, torch.tensor(float("inf")))
    # Nearest, ties to the even bit pattern.
    return min(
        (down, f, up), key=lambda x: (abs(Fraction(float(x)) - v), int(x.view(torch.int32)) & 1)
    ).item()


@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x, y, z = (tl.load(p + offs, mask=mask) for p in (x_ptr, y_ptr, z_ptr))
    tl.store(out_ptr + offs, tl.fma(x, y, z), mask=mask)


def run_fma(x, y, z):
    out = torch.empty_like(x)
    _fma_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, z, out, x.numel(), BLOCK=4096)
    return out


def test_interpreted_fma_rounds_once():
    gen = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(2000, generator=gen) for _ in range(3))
    # A double-rounding trap: x*y + z lies just below the midpoint between two fp32
    # values, and rounding it to fp64 first lands exactly on the midpoint.
    x[0], y[0], z[0] = 2.0**-24 * (1 + 2.0**-23), 1 - 2.0**-23, 1 + 2.0**-23
    x[1], y[1], z[1] = -x[0], y[0], -z[0]
    got = run_fma(x, y, z)
    want = torch.tensor([exact_fma_f32(*map(float, t)) for t in zip(x, y, z)])
    assert torch.equal(got, want)
    assert got[0].item() == 1 + 2.0**-23  # x*y + z rounded twice would be 1 + 2^-22


def test_interpreted_fma_special_values():
    special = torch.tensor(
        [0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan"), 3.4e38, 1e-45]
    )
    x, y, z = torch.meshgrid(special, special, special, indexing="ij")
    x, y, z = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    got = run_fma(x, y, z)
    want = (x.double() * y.double() + z.double()).float()  # exact here: no inexact sums
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


# ---- exact widening -----------------------------------------------------------------------

widen = triton_backend.kernels().rounding.widen if triton_backend.unavailable() is None else None


@triton.jit
def _widen_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, widen(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widen_is_exact_for_every_16bit_value(dtype):
    """Subnormals included (the interpreter's own bf16 -> fp32 cast flushes them)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    y = torch.empty(x.shape, dtype=torch.float32)
    block = 1 << 16
    _widen_kernel[(1,)](x, y, x.numel(), BLOCK=block)
    want = x.float()
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~y.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))
