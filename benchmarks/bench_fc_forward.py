"""Forward time of a compressed FC + adapter against the dense FC, on CPU, batch 1 and 256.

    python -m benchmarks.bench_fc_forward [--rank 32]

The layer is resnet18's FC shape (1000 x 512) with random weights (the time does not depend on
their values). Forms, each timed in this one run:
- dense: the original fp32 FC;
- simulated: W_c held as a dense matrix, plus the adapter (what training and evaluation use);
- unpacked at load: the packed checkpoint read back; block-sparse W_c as a CSR sparse matrix,
  int1 W_c expanded to a dense +-alpha matrix (PyTorch has no 1-bit CPU kernel), plus the
  adapter. The load itself (read, unpack, expand) is timed too.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, seconds_per_call
from compression import make_config
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.checkpoint import read_packed, write_packed

OUT_FEATURES, IN_FEATURES = 1000, 512
LABELS = {"sparse": "4x4", "int1": "row scale"}


def adapter(x: torch.Tensor, layer) -> torch.Tensor:
    return layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.manual_seed(0)
    dense = torch.nn.Linear(IN_FEATURES, OUT_FEATURES).requires_grad_(False)
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for method in ("sparse", "int1"):
            config = make_config(method)
            context = make_init_context(dense, config)
            layer = make_lora_linear(dense, LoraConfig(r=args.rank, init="svd_init"), context)
            path = Path(folder) / f"{method}.safetensors"
            write_packed(path, layer)
            load_seconds = seconds_per_call(lambda p=path: read_packed(p), args.min_run_time)
            loaded = read_packed(path).layer
            weight = loaded.base_layer.weight
            if method == "sparse":
                sparse_weight = weight.to_sparse_csr()

                def unpacked(x, w=sparse_weight, lay=loaded):
                    base = torch.sparse.mm(w, x.T).T + lay.base_layer.bias
                    return base + adapter(x, lay)

                form = "CSR"
            else:

                def unpacked(x, lay=loaded):
                    return F.linear(x, lay.base_layer.weight, lay.base_layer.bias) + adapter(x, lay)

                form = "dense"
            name = f"{method} {LABELS[method]} + r{args.rank}"
            rows.append((f"{name}, simulated", lambda x, lay=layer: lay(x)))
            rows.append((f"{name}, unpacked ({form})", unpacked))
            print(f"load {name}: {path.stat().st_size} bytes read and unpacked in "
                  f"{load_seconds * 1e3:.2f} ms")  # fmt: skip
        # the unpacked forms compute what the trained layer computes
        check = torch.randn(8, IN_FEATURES)
        for (_, simulated), (_, unpacked) in zip(rows[::2], rows[1::2], strict=True):
            torch.testing.assert_close(unpacked(check), simulated(check), rtol=1e-4, atol=1e-4)

        print(f"\nforward time, {machine()}")
        results = {}
        for batch in (1, 256):
            x = torch.randn(batch, IN_FEATURES)
            results[("dense FC", batch)] = seconds_per_call(lambda x=x: dense(x), args.min_run_time)
            for name, fn in rows:
                results[(name, batch)] = seconds_per_call(lambda f=fn, x=x: f(x), args.min_run_time)
    width = max(len(name) for name, _ in rows)
    print(
        f"{'form':{width}s} {'batch 1':>11s} {'vs dense':>9s} {'batch 256':>11s} {'vs dense':>9s}"
    )
    ratios = {}
    for name in ["dense FC"] + [name for name, _ in rows]:
        cells = []
        for batch in (1, 256):
            value = results[(name, batch)]
            ratios[(name, batch)] = value / results[("dense FC", batch)]
            cells.append(f"{value * 1e6:9.1f}us {ratios[(name, batch)]:8.2f}x")
        print(f"{name:{width}s} {cells[0]} {cells[1]}")
    summary = "; ".join(
        f"{name} {ratios[(name, 1)]:.2f}x / {ratios[(name, 256)]:.2f}x" for name, _ in rows
    )
    print(f"forward time vs the dense FC (batch 1 / batch 256): {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
