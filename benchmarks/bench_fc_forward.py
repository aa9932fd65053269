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

from benchmarks.common import REPEATS, interleaved, machine, ratio_line, seconds_per_call
from compression import make_config
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.network_checkpoint import read_packed

OUT_FEATURES, IN_FEATURES = 1000, 512
LABELS = {"sparse": "4x4", "int1": "row scale"}


def adapter(x: torch.Tensor, layer) -> torch.Tensor:
    return layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per load timing")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved repetitions")
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
        # A repetition is a block of calls (one call takes microseconds); every variant runs
        # its block in turn, repetition after repetition, so a busy moment hits all alike.
        summary = []
        for batch, calls in ((1, 2000), (256, 200)):
            x = torch.randn(batch, IN_FEATURES)
            variants = {"dense FC": lambda x=x, n=calls: [dense(x) for _ in range(n)]}
            for name, fn in rows:
                variants[name] = lambda f=fn, x=x, n=calls: [f(x) for _ in range(n)]
            print(f"batch {batch}: {calls} calls per repetition")
            timings = interleaved(variants, args.repeats)
            for timing in timings.values():
                print("  " + timing.line(1e6 / calls, "us per call"))
            for name, _ in rows:
                line = ratio_line(timings[name], timings["dense FC"], "time vs the dense FC")
                print("  " + line)
                median = timings[name].median / timings["dense FC"].median
                summary.append(f"{name}, batch {batch}: {median:.2f}x")
    print(f"forward time vs the dense FC (ratio of medians): {'; '.join(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
