"""NOTE [explicit RNE in Triton]: the kernels' narrowing equals torch's rounding, bit for bit.

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

narrow = triton_backend.kernels().rounding.narrow if triton_backend.available() is None else None


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
