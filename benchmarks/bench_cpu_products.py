"""The products of one engine step on a CPU, through torch's BLAS against oneDNN.

    python -m benchmarks.bench_cpu_products [--threads 1] [--shapes 32x128 512x128 ...]

A step of the engine (``train_evaluate/training/batched.py``) at batch n and rank r makes five
products over 512 features and 1,000 classes: the hidden h = x A^T and the logits base + h B^T
forward, dB, dh = g B and dA backward, 2 x 4,024 x n x r flops in all. Each shape is timed both
ways, in the layouts the engine uses (``logits_and_hidden`` and ``adapter_grads``, their small
scalings and the base's addition included), as blocks of calls, interleaved; the figures are
flops over the median time. The engine takes oneDNN from ``batched.ONEDNN_STEP_WORK`` up.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import REPEATS, interleaved, machine, ratio_line
from train_evaluate.training import batched

IN_FEATURES, CLASSES = 512, 1000
SHAPES = ("32x16", "32x128", "128x32", "256x16", "512x8", "512x128")


def step_products(n: int, rank: int, onednn: bool, calls: int):
    """A function making ``calls`` steps' products at batch n and rank r."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN_FEATURES, generator=generator)
    base = torch.randn(n, CLASSES, generator=generator)
    grad = torch.randn(1, n, CLASSES, generator=generator)
    a = torch.randn(1, rank, IN_FEATURES, generator=generator)
    b = torch.randn(1, CLASSES, rank, generator=generator)
    scale = torch.ones(1, 1, 1)

    def run() -> None:
        for _ in range(calls):
            _, hidden = batched.logits_and_hidden(x, base, a, b, scale, onednn)
            batched.adapter_grads(x, hidden, grad, b, scale, onednn)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="batch x rank")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repetitions")
    args = parser.parse_args(argv)
    if not batched.onednn_available():
        print("error: this torch has no oneDNN (torch.backends.mkldnn)", file=sys.stderr)
        return 2
    if args.threads < 1 or args.repeats < 1:
        print("error: --threads and --repeats take a whole number from 1", file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise ValueError
    except ValueError:
        print("error: --shapes takes batch x rank from 1, e.g. 32x128", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"one engine step's products, torch's BLAS against oneDNN; {machine()}")
    for n, rank in shapes:
        flops = 2 * 4024 * n * rank
        calls = max(1, int(1e10 / flops))  # about 50 ms a block at 200 GFLOP/s
        timings = interleaved(
            {
                "torch": step_products(n, rank, False, calls),
                "onednn": step_products(n, rank, True, calls),
            },
            repeats=args.repeats,
        )
        rates = ", ".join(
            f"{name} {flops * calls / t.median / 1e9:.0f} GFLOP/s "
            f"({1e6 * t.median / calls:.0f} us a step)"
            for name, t in timings.items()
        )
        onednn = batched.use_onednn(torch.zeros(1), n, rank, IN_FEATURES + CLASSES)
        chosen = "onednn" if onednn else "torch"
        print(f"batch {n}, rank {rank}: {rates}; the engine takes {chosen}")
        print("  " + ratio_line(timings["torch"], timings["onednn"], "onednn's speedup"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
