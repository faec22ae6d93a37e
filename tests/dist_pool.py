"""A pool of spawned gloo ranks that runs test cases one after another.

Starting a rank (a fresh interpreter importing torch, then ``init_process_group``)
costs seconds on a small machine; the distributed tests start one pool per world
size and send it case after case. A case is the name of a function in
tests/dist_cases.py plus keyword arguments; every rank runs it and sends back its
return value (through ``torch.save``, so tensors need no shared memory). A case
that raises on any rank, or does not finish in time, fails with every rank's
traceback and the pool is restarted: the other ranks may be stuck in a
collective, and the next case must not inherit that.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import sys
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

# Every rank's collectives give up after this long, so a rank whose peer died
# raises instead of hanging until the case timeout.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, world: int, port: int, tests_dir: str, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Several ranks share few cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip
    sys.path.insert(0, tests_dir)
    import dist_cases

    outbox.put((rank, "ready", None))
    while True:
        message = inbox.get()
        if message is None:
            break
        name, kwargs = message
        try:
            result = getattr(dist_cases, name)(**kwargs)
            outbox.put((rank, "ok", dumps(result)))
        except BaseException:
            outbox.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class CaseFailed(AssertionError):
    pass


class Pool:
    """``world`` spawned gloo ranks; ``run(name, **kwargs)`` returns every rank's result."""

    def __init__(self, world: int, *, start_timeout_s: float = 180.0) -> None:
        self.world = world
        self.start_timeout_s = start_timeout_s
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        self._inboxes = [ctx.Queue() for _ in range(self.world)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_serve, args=(r, self.world, port, tests_dir, self._inboxes[r], self._outbox),
                daemon=True,
            )
            for r in range(self.world)
        ]  # fmt: skip
        for p in self._procs:
            p.start()
        self._collect("start", self.start_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list:
        results: dict[int, tuple[str, Any]] = {}
        while len(results) < self.world:
            try:
                rank, status, payload = self._outbox.get(timeout=timeout_s)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.restart()
                raise CaseFailed(
                    f"{what}: ranks {sorted(set(range(self.world)) - set(results))} did not answer "
                    f"within {timeout_s:.0f} s (dead: {dead}); answers: {results}"
                ) from None
            results[rank] = (status, payload)
        errors = {r: p for r, (s, p) in results.items() if s == "error"}
        if errors:
            self.restart()
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise CaseFailed(f"{what} failed on ranks {sorted(errors)}:\n{text}")
        return [results[r][1] for r in range(self.world)]

    def run(self, name: str, timeout_s: float = 240.0, **kwargs: Any) -> list[Any]:
        """Run ``dist_cases.<name>(**kwargs)`` on every rank; the results in rank order."""
        for inbox in self._inboxes:
            inbox.put((name, kwargs))
        return [loads(b) for b in self._collect(name, timeout_s)]

    def restart(self) -> None:
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for inbox in self._inboxes:
                inbox.put(None)
            for p in self._procs:
                p.join(timeout=20)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
