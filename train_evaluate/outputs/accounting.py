"""What a run stores, bit for bit (the FC study's one layer or a network's selected layers):
every bit of the selected layers (values, indices, scales, adapters at their dtype, the biases
they have) against their dense fp32 size, per layer and in total (``bits_per_weight``), and of
the whole model (``model_bits_per_weight``); and layers.csv, one row per compressed layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from compression import StorageCost
from compression.accounting import account_layer, dense_cost, model_bits_per_weight
from lora.rounding import adapter_storage
from train_evaluate.inputs.selection import LayerInfo


@dataclass(frozen=True)
class Accounting:
    """How a run prices its rows (the FC study's, one layer; a whole network's, every selected
    layer): every selected layer with its own clamped rank,
    its compressor's exact cost and its adapter at the stored dtype; the rest of the model at
    its own dtype for ``ratio_model`` and ``model_bits_per_weight``.

    The bias, as in the FC study: ``bits`` and ``bits_per_weight`` hold every bit the packed
    file stores, so the biases the selected layers have, always; ``include_bias`` decides only
    the ratios, counting those biases on both sides or on neither. A layer without a bias adds
    nothing anywhere. ``model_weights``: the Linear and Conv2d weights of the whole model."""

    layers: tuple[LayerInfo, ...]
    costs: tuple[StorageCost, ...]
    adapter_dtype: str  # how the adapters are stored (--adapter-dtype)
    dora: bool
    include_bias: bool
    backbone_bits: int  # every other parameter and buffer of the model
    selection: str
    model_weights: int | None = None
    # a per-layer plan: each layer's own requested rank, whatever rank a row names (0: none)
    ranks: tuple[int, ...] | None = None
    # and each layer's own adapter dtype
    adapter_dtypes: tuple[str, ...] | None = None

    def per_layer(self, rank: int, costs: Sequence[StorageCost] | None = None):
        costs = self.costs if costs is None else costs
        ranks = self.ranks or (rank,) * len(self.layers)
        dtypes = self.adapter_dtypes or (self.adapter_dtype,) * len(self.layers)
        for info, cost, own, dtype in zip(self.layers, costs, ranks, dtypes, strict=True):
            r = info.rank(own) if rank and own else 0
            value_bits, code_bits = adapter_storage(dtype)
            yield (
                info,
                r,
                account_layer(
                    *info.matrix,
                    cost,
                    r,
                    adapter_dtype_bits=value_bits,
                    extra_adapter_params=info.shape[0] if self.dora and r else 0,
                    include_bias=self.include_bias,
                    adapter_code_bits=code_bits,
                    has_bias=info.bias,
                ),
            )

    def weights(self) -> int:
        return sum(math.prod(info.matrix) for info in self.layers)

    def budget_bits(self, bits_per_weight: float) -> int:
        """What ``--bits-budget`` B leaves the selected layers, in whole bits: B bits per weight
        of the whole model (``model_bits_per_weight``: every stored bit over every Linear and
        Conv2d weight) less what the rest of the model stores; negative when the rest alone is
        over B."""
        if not self.model_weights:
            raise ValueError("a bit budget over the whole model needs its weight count")
        return math.floor(bits_per_weight * self.model_weights) - self.backbone_bits

    def model_bits(self, selected_bits: int) -> float:
        """``model_bits_per_weight`` of a model whose selected layers store ``selected_bits``."""
        return model_bits_per_weight(self.backbone_bits, selected_bits, self.model_weights)

    def original_cost(self) -> StorageCost:
        """The selected layers uncompressed (fp32), for the ``original`` row."""
        costs = [dense_cost(*info.matrix) for info in self.layers]
        return StorageCost(*(sum(getattr(c, f) for c in costs) for f in StorageCost.__match_args__))

    def columns(self, cost: StorageCost, rank: int) -> dict[str, Any]:
        """The ratio columns of a row: ``cost`` is ``original_cost()`` for the ``original`` row;
        every other row prices each layer with its own compressor cost (``costs``)."""
        original = cost == self.original_cost()
        costs = [dense_cost(*info.matrix) for info in self.layers] if original else None
        rows = list(self.per_layer(rank, costs))
        dense_bits = sum(a.dense_bits for _, _, a in rows)
        bits = sum(a.compressed_bits for _, _, a in rows)  # the ratios' side: include_bias
        stored = sum(a.stored_bits for _, _, a in rows)  # what the file holds: biases too
        seed_bits = sum(a.seed_bits for _, _, a in rows)
        dense_macs = sum(a.dense_macs * info.positions for info, _, a in rows)
        macs = sum(a.compressed_macs * info.positions for info, _, a in rows)
        return {
            "ratio": dense_bits / bits,
            "ratio_seed": dense_bits / seed_bits,
            "ratio_model": (self.backbone_bits + dense_bits) / (self.backbone_bits + bits),
            "compute_ratio": dense_macs / macs,
            "bits": stored,
            "bias_counted": self.include_bias,
            "layers": self.selection,
            "bits_per_weight": stored / self.weights(),
            "model_bits_per_weight": self.model_bits(stored),
        }

    @property
    def dense_bytes(self) -> int:
        """The selected layers' weights and the biases they have, at fp32: what ``ratio_file``
        divides (a bias-free conv has no bias to count)."""
        return 4 * sum(
            math.prod(info.matrix) + (info.shape[0] if info.bias else 0) for info in self.layers
        )

    def layer_rows(self, method: str, rank: int) -> list[dict[str, Any]]:
        """``layers.csv`` rows of one (method, rank): each layer's shape, clamped rank, bits and
        ratio."""
        return [
            {
                "quant": method,
                "lora_rank": rank,
                "layer": info.name,
                "kind": info.kind,
                "shape": "x".join(map(str, info.shape)),
                "rank": r,
                "bits": a.stored_bits,
                "bits_per_weight": a.stored_bits / math.prod(info.matrix),
                "ratio": a.ratio,
            }
            for info, r, a in self.per_layer(rank)
        ]


LAYER_COLUMNS = (
    "quant", "lora_rank", "layer", "kind", "shape", "rank", "bits", "bits_per_weight", "ratio",
)  # fmt: skip


RECONSTRUCTION_COLUMNS = ("block", "block_error_start", "block_error_end", "block_codes_changed")


def with_reconstruction(
    rows: Sequence[dict[str, Any]], stages: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """``rows`` (one rank's layers.csv rows) with the block each layer was reconstructed in and
    that block's relative error before and after and the stored codes learned rounding changed
    in it. ``stages``: the rank record's ``reconstruction`` (``UnitRecord`` fields), the same
    whether the rank ran here or was reused from an earlier run or another worker."""
    by_layer = {}
    for stage in stages or ():
        if stage["unit"] != "network":
            by_layer.update(dict.fromkeys(stage["layers"], stage))
    out = []
    for row in rows:
        stage = by_layer.get(row["layer"])
        extra = (
            (stage["unit"], stage["error_start"], stage["error_end"], stage["codes_changed"])
            if stage
            else (None,) * len(RECONSTRUCTION_COLUMNS)
        )
        out.append({**row, **dict(zip(RECONSTRUCTION_COLUMNS, extra, strict=True))})
    return out


BUDGET_COLUMNS = ("choice", "sensitivity")


def with_budget(rows: Sequence[dict[str, Any]], budget: Any) -> list[dict[str, Any]]:
    """``rows`` (the budgeted method's layers.csv rows) with each layer's chosen method and
    its measured sensitivity (``--bits-budget``)."""
    chosen = {c.layer: c for c in budget.chosen}
    return [
        {**row, "choice": chosen[row["layer"]].method,
         "sensitivity": chosen[row["layer"]].sensitivity}
        for row in rows
    ]  # fmt: skip


def layers_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``layers.csv``: one line per (method, rank, layer); with ``--bits-budget``, the budgeted
    layers' choice and sensitivity; with ``--reconstruct``, each layer's block and its errors."""
    import pandas as pd

    columns = list(LAYER_COLUMNS)
    if any("choice" in row for row in rows):
        columns += BUDGET_COLUMNS
    if any("block" in row for row in rows):
        columns += RECONSTRUCTION_COLUMNS
    frame = pd.DataFrame(list(rows), columns=columns)
    return frame.to_csv(index=False, float_format="%.6g")
