"""Round-to-nearest-even vs stochastic rounding for bf16 AdamW moments: a short measurement.

A small byte-level language model (embedding, two-layer MLP over a context of
bytes of this repository's own Python sources, tied output) trained with AdamW
on fp32 parameters whose moments are stored (a) in fp32, (b) in bf16 rounded to
nearest even (what the kernels do), (c) in bf16 with stochastic rounding. The
update itself is the reference AdamW in fp32 registers; only the store of m and
v differs. Prints the training loss (last 100 steps) and the held-out loss per
mode and seed. The decision and the numbers are in NOTE [bf16 moments rounding]
(fastopt/_compressed.py).

    python scripts/bf16_moment_rounding.py [--steps 1500] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch


def corpus(ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = pathlib.Path(__file__).resolve().parents[1]
    text = b"".join(p.read_bytes() for p in sorted(root.glob("fastopt/**/*.py")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


def batch(data: torch.Tensor, ctx: int, n: int, gen: torch.Generator):
    idx = torch.randint(0, data.numel() - ctx - 1, (n,), generator=gen)
    x = torch.stack([data[i : i + ctx] for i in idx.tolist()])
    return x, data[idx + ctx]


def model(ctx: int, dim: int, gen: torch.Generator) -> list[torch.Tensor]:
    def init(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    return [
        init(256, dim, scale=0.1),
        init(ctx * dim, 4 * dim, scale=1 / math.sqrt(ctx * dim)),
        init(4 * dim, dim, scale=1 / math.sqrt(4 * dim)),
    ]


def loss_of(params, x, y):
    emb, w1, w2 = params
    h = emb[x].flatten(1)
    h = torch.nn.functional.gelu(h @ w1) @ w2
    return torch.nn.functional.cross_entropy(h @ emb.t(), y)


def store(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """x as the moment storage holds it (returned in fp32)."""
    if mode == "fp32":
        return x
    if mode == "bf16-rne":
        return x.to(torch.bfloat16).float()
    # stochastic: add uniform 16-bit noise below the kept bits, then truncate
    u = x.view(torch.int32).to(torch.int64)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int64)
    u = ((u + noise) >> 16) << 16
    u = torch.where(u >= 2**31, u - 2**32, u)
    out = u.to(torch.int32).view(torch.float32)
    return torch.where(x.isfinite(), out, x)


def train_with(store_fn, seed: int, steps: int, *, update_from_stored: bool, ctx=16, dim=64,
               lr=3e-3):  # fmt: skip
    """The training run with moments kept as ``store_fn(x, second)`` returns them
    (second: whether x is v). ``update_from_stored``: the step reads the stored
    moments (this script's runs) rather than the fresh fp32 ones (what the
    kernels do: scripts/int8_moment_schemes.py). Returns (train loss of the last
    100 steps, held-out loss)."""
    gen = torch.Generator().manual_seed(seed)
    train_data, val_data = corpus(ctx)
    params = model(ctx, dim, gen)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    losses = []
    for t in range(1, steps + 1):
        x, y = batch(train_data, ctx, 64, gen)
        loss = loss_of(params, x, y)
        grads = torch.autograd.grad(loss, params)
        losses.append(loss.item())
        lr_t = lr * min(1.0, t / 100) * 0.5 * (1 + math.cos(math.pi * t / steps))
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v):
                p.mul_(1 - lr_t * wd)
                m_new = mi.lerp(g, 1 - b1)
                v_new = vi * b2 + (1 - b2) * g * g
                mi.copy_(store_fn(m_new, False))
                vi.copy_(store_fn(v_new, True))
                if update_from_stored:
                    m_new, v_new = mi, vi
                denom = v_new.sqrt() / math.sqrt(1 - b2**t) + eps
                p.addcdiv_(m_new, denom, value=-lr_t / (1 - b1**t))
    vgen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        val = sum(loss_of(params, *batch(val_data, ctx, 512, vgen)).item() for _ in range(8)) / 8
    return sum(losses[-100:]) / 100, val


def train(mode: str, seed: int, steps: int):
    rgen = torch.Generator().manual_seed(seed + 1000)
    return train_with(lambda x, second: store(x, mode, rgen), seed, steps,
                      update_from_stored=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'mode':10} {'seed':>4} {'train (last 100)':>17} {'val':>8}  (nats/byte)")
    results: dict[str, list[float]] = {}
    start = time.time()
    for seed in range(args.seeds):
        for mode in ("fp32", "bf16-rne", "bf16-sr"):
            tr, val = train(mode, seed, args.steps)
            results.setdefault(mode, []).append(val)
            print(f"{mode:10} {seed:>4} {tr:17.4f} {val:8.4f}", flush=True)
    for mode, vals in results.items():
        delta = [a - b for a, b in zip(vals, results["fp32"])]
        print(f"{mode:10} mean val {sum(vals) / len(vals):.4f}  vs fp32 "
              f"{sum(delta) / len(delta):+.4f}")  # fmt: skip
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
