"""Which 8-bit blockwise code for AdamW moments: a measurement (issue 12).

Trains the byte-level MLP language model of scripts/bf16_moment_rounding.py
(same data, model, schedule and update) with the moments m and v stored in
each candidate 8-bit code, and prints the held-out loss against fp32 moments
per seed. The update runs in fp32 from the stored moments, and only the store
differs, as in the kernels. The decision and the numbers are in NOTE [int8
moments] (fastopt/_compressed.py).

The candidates (each tensor is cut into groups of G consecutive elements, one
scale per group; both codes use 1 byte per element):

* ``dyn256``: the dynamic code of bitsandbytes' 8-bit optimizers, block 256
  with an fp32 absmax per block. 256 values, a sign (m only), a power of ten
  (10^-6 .. 10^0) and a linear fraction whose resolution grows with the
  decade. Each value goes to its nearest code.
* ``comp32``: companded linear codes in groups of 32 with a bf16 scale: m as
  127 * sign(m) * sqrt(|m| / s), v as 255 * (v / s)^(1/4), rounded to
  nearest and clamped to the top code; s is the group's absmax rounded to
  nearest bf16.
* ``dyn32`` and ``comp256``: the same codes at the other group size and scale,
  to separate the code from the group.
* ``...sr``: the same code with stochastic rounding (to one of the two
  neighbouring codes, the nearer one the more likely, unbiased in the coded
  domain) instead of nearest.

    python scripts/int8_moment_schemes.py [--steps 2000] [--seeds 5]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bf16_moment_rounding import train_with  # noqa: E402

SMALL = 4096  # tensors with fewer elements keep fp32 moments, as in bitsandbytes


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 values of the dynamic code, sorted (see the module docstring)."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += mids
        if signed:
            values += [-x for x in mids]
    code = torch.tensor(sorted(values), dtype=torch.float64)
    assert code.numel() == 256, code.numel()
    return code.float()


CODES = {True: dynamic_code(True), False: dynamic_code(False)}


def groups(x: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % g
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, g), pad


def ungroup(q: torch.Tensor, x: torch.Tensor, pad: int) -> torch.Tensor:
    flat = q.reshape(-1)
    return flat[: flat.numel() - pad].view_as(x)


def scale_of(absmax: torch.Tensor, g: int) -> torch.Tensor:
    """The group's stored scale: fp32 at block 256, bf16 (to nearest) in groups of 32."""
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if g < 256 and not ROUND_UP:
        return scale.to(torch.bfloat16).float()
    if g < 256:
        r = scale.to(torch.bfloat16)
        bits = r.view(torch.int16) + (r.float() < scale).to(torch.int16)
        return bits.view(torch.bfloat16).float()
    return scale


# A bf16 scale rounded UP (every element then codes inside the range) makes the
# group's largest element decode to the rounded-up scale: up to 2^-8 more each
# store, which an EMA with beta2 = 0.999 compounds ~1000-fold (measured: +0.017
# nats/byte on seed 0 for comp32, against +0.0002 with the scale rounded to
# nearest and the top code clamped). Kept as a switch for the record.
ROUND_UP = False


def stochastic_round(y: torch.Tensor) -> torch.Tensor:
    """floor(y + u), u uniform in [0, 1): unbiased rounding to an integer."""
    return torch.floor(y + torch.rand(y.shape, generator=NOISE))


NOISE = torch.Generator().manual_seed(2024)


def qdq_dynamic(x: torch.Tensor, g: int, signed: bool, sr: bool = False) -> torch.Tensor:
    xg, pad = groups(x, g)
    scale = scale_of(xg.abs().amax(dim=1, keepdim=True), g)
    code = CODES[signed]
    mids = (code[1:] + code[:-1]) / 2
    r = (xg / scale).clamp(-1, 1)
    idx = torch.bucketize(r, mids)
    if sr:  # between the two neighbouring codes, with probability by distance
        hi = torch.bucketize(r, code).clamp(1, code.numel() - 1)
        lo_v, hi_v = code[hi - 1], code[hi]
        up = torch.rand(r.shape, generator=NOISE) < (r - lo_v) / (hi_v - lo_v)
        idx = torch.where(up, hi, hi - 1)
    return ungroup(code[idx] * scale, x, pad)


def qdq_companded(x: torch.Tensor, g: int, second: bool, sr: bool = False) -> torch.Tensor:
    xg, pad = groups(x, g)
    scale = scale_of(xg.abs().amax(dim=1, keepdim=True), g)
    r = (xg / scale).clamp(-1, 1)
    rnd = stochastic_round if sr else torch.round
    if second:  # v >= 0: 255 levels of v^(1/4)
        q = rnd(r.sqrt().sqrt() * 255) / 255
        out = q.square().square() * scale
    else:
        q = rnd(r.abs().sqrt() * 127) / 127
        out = r.sign() * q.square() * scale
    return ungroup(out, x, pad)


def store(x: torch.Tensor, mode: str, second: bool) -> torch.Tensor:
    if mode == "fp32" or x.numel() < SMALL:
        return x
    if mode == "bf16":
        return x.to(torch.bfloat16).float()
    sr = mode.endswith("sr")
    kind, g = re.fullmatch(r"(dyn|comp)(\d+)(?:sr)?", mode).groups()
    if kind == "dyn":
        return qdq_dynamic(x, int(g), signed=not second, sr=sr)
    return qdq_companded(x, int(g), second, sr=sr)


MODES = ("fp32", "bf16", "dyn256", "comp32", "comp256", "dyn256sr", "comp32sr", "dyn32")
BYTES = {  # per moment element: the code plus its group's scale
    "fp32": 4.0, "bf16": 2.0, "dyn256": 1 + 4 / 256, "comp256": 1 + 4 / 256,
    "comp32": 1 + 2 / 32, "dyn32": 1 + 2 / 32, "dyn256sr": 1 + 4 / 256, "comp32sr": 1 + 2 / 32,
}  # fmt: skip


def train(mode: str, seed: int, steps: int):
    return train_with(lambda x, second: store(x, mode, second), seed, steps,
                      update_from_stored=False)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--round-up", action="store_true", help="bf16 scales rounded up (the ratchet)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    global ROUND_UP
    ROUND_UP = args.round_up
    modes = args.modes.split(",")
    print(f"{'mode':8} {'seed':>4} {'train (last 100)':>17} {'val':>8}  (nats/byte)")
    results: dict[str, list[float]] = {}
    start = time.time()
    for seed in range(args.seeds):
        for mode in modes:
            tr, val = train(mode, seed, args.steps)
            results.setdefault(mode, []).append(val)
            print(f"{mode:8} {seed:>4} {tr:17.4f} {val:8.4f}", flush=True)
    print(f"\n{'mode':8} {'B/moment':>8} {'mean val':>9} {'vs fp32':>8} {'worst seed':>10}")
    for mode, vals in results.items():
        delta = [a - b for a, b in zip(vals, results["fp32"])]
        print(f"{mode:8} {BYTES[mode]:8.4f} {sum(vals) / len(vals):9.4f} "
              f"{sum(delta) / len(delta):+8.4f} {max(delta):+10.4f}")  # fmt: skip
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
