"""intN for every N from 2 to 8 on three grids (``--int-grid``: symmetric, full, affine) with
scales stored at fp32 or fp16 (``--scale-dtype``): codes within the grid, packed at exactly N
bits, every stored bit counted, hand examples of the grids, and the calibrated compressors
(mse scale, GPTQ, learned rounding) on each grid."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from compression import IntNConfig, compress, expand, make_config, method_of
from compression.gptq import second_moment, weighted_row_errors
from compression.integer import INT_GRIDS, SCALE_DTYPES, row_zero, signed_codes
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.config import cli
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.network_checkpoint import read_packed

ROWS, COLS = 7, 61  # 427 codes: never a whole number of bytes


def weight(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # heavy tails (Student's t, 2 degrees of freedom), which the mse scale clips (their codes
    # then sit on the grid's ends); a row all positive, one mostly negative
    chi2 = torch.randn(2, rows, cols, generator=generator).pow(2).sum(0)
    w = torch.randn(rows, cols, generator=generator) / (chi2 / 2).sqrt()
    w[0] = w[0].abs() + 0.1
    w[1] = -w[1].abs() * 3 + 0.2
    return w


CONFIGS = [
    IntNConfig(bits, int_grid=grid, scale_dtype=dtype, int_scale=scale)
    for bits, grid, dtype, scale in itertools.product(
        range(2, 9), INT_GRIDS, SCALE_DTYPES, ("max", "mse")
    )
]


def signed_range(config: IntNConfig, zero: torch.Tensor | None) -> tuple:
    """The signed codes each grid allows, written out: symmetric 2^N - 1 levels about 0, full
    the signed N-bit range, affine the unsigned one less the row's zero point."""
    half = 2 ** (config.bits - 1)
    if config.int_grid == "symmetric":
        return -(half - 1), half - 1
    if config.int_grid == "full":
        return -half, half - 1
    return -zero, 2 * half - 1 - zero


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_codes_lie_in_the_grid_and_the_file_holds_exactly_n_bits_each(config, tmp_path):
    compressed = compress(weight(), config)
    codes = signed_codes(compressed)
    lo, hi = signed_range(config, row_zero(compressed))
    assert bool(((codes >= lo) & (codes <= hi)).all())
    assert torch.equal(codes, codes.round())
    stored = compressed.parts["codes"]
    assert int(stored.max()) < 2**config.bits and int(stored.min()) >= 0
    # the weight is exactly the codes on the stored scales
    scale = compressed.parts["scale"]
    assert scale.dtype == SCALE_DTYPES[config.scale_dtype]
    assert torch.equal(compressed.weight, codes * scale.float())
    assert torch.equal(expand(compressed.parts, config, (ROWS, COLS)), compressed.weight)
    # every stored bit counted: N per code, the scales at their dtype, N per zero point
    zero_bits = ROWS * config.bits if config.int_grid == "affine" else 0
    scale_bits = ROWS * (16 if config.scale_dtype == "fp16" else 32)
    cost = compressed.cost
    assert (cost.value_bits, cost.scale_bits) == (ROWS * COLS * config.bits, scale_bits + zero_bits)
    # the packed file: codes and zero points at exactly N bits (the last byte padded)
    layer = make_lora_linear(
        nn.Linear(COLS, ROWS), LoraConfig(r=2, lora_alpha=4, init="svd_init"),
        make_init_context(nn.Linear(COLS, ROWS), config),
    )  # fmt: skip
    with torch.no_grad():
        layer.base_layer.set_compressed(compressed)
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    with safe_open(str(path), framework="pt") as handle:
        sizes = {k.split("/")[-1]: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert sizes["base.codes"].numel() == math.ceil(ROWS * COLS * config.bits / 8)
    if config.int_grid == "affine":
        assert sizes["base.zero"].numel() == math.ceil(ROWS * config.bits / 8)
    else:
        assert "base.zero" not in sizes
    assert sizes["base.scale"].dtype == SCALE_DTYPES[config.scale_dtype]
    loaded = read_packed(path).layer
    assert loaded.base_compressed.config == config
    assert torch.equal(loaded.base_layer.weight, compressed.weight)


@pytest.mark.parametrize("bits", range(2, 9))
def test_the_grids_give_a_row_their_number_of_levels(bits):
    """A row spread evenly over its grid's range takes every level the grid has: 2^N - 1
    symmetric, 2^N full (on [-2^(N-1), 2^(N-1) - 1]); affine 2^N on any range."""
    steps = 2**bits
    rows = {
        "symmetric": torch.linspace(-1, 1, 4 * steps),
        "full": torch.linspace(-steps / 2, steps / 2 - 1, 4 * steps),
        "affine": torch.linspace(-0.3, 2, 4 * steps),
    }
    levels = {
        grid: len(signed_codes(compress(row[None], IntNConfig(bits, int_grid=grid))).unique())
        for grid, row in rows.items()
    }
    assert levels == {"symmetric": steps - 1, "full": steps, "affine": steps}


def test_the_affine_grid_at_int2_by_hand():
    """Four levels per row and a zero point: row 1 spans [-1, 2], so s = 3 / 3 = 1 and
    z = round(1 / 1) = 1, the codes q in [-1, 2]; row 2 spans [0, 3] (the range always holds
    zero), s = 1, z = 0, q in [0, 3]."""
    w = torch.tensor([[-1.0, -0.2, 0.3, 2.0], [0.4, 1.1, 1.6, 3.0]])
    compressed = compress(w, IntNConfig(2, int_grid="affine"))
    assert torch.equal(compressed.parts["scale"], torch.tensor([[1.0], [1.0]]))
    assert compressed.parts["zero"].tolist() == [1, 0]
    assert compressed.parts["codes"].reshape(2, 4).tolist() == [[0, 1, 1, 3], [0, 1, 2, 3]]
    assert compressed.weight.tolist() == [[-1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 2.0, 3.0]]
    # the symmetric grid has three levels: s = 2 and 3, codes in {-1, 0, 1} (-1 / 2 rounds to
    # even, 0): row 1 loses its negative side
    symmetric = compress(w, IntNConfig(2))
    assert symmetric.weight.tolist() == [[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 3.0]]


def test_the_full_grid_at_int2_by_hand():
    """Codes -2, -1, 0, 1: the row [-2, -1, 0.4, 1] takes scale max(1 / 1, 2 / 2) = 1."""
    compressed = compress(torch.tensor([[-2.0, -1.0, 0.4, 1.0]]), IntNConfig(2, int_grid="full"))
    assert compressed.parts["scale"].item() == 1.0
    assert compressed.weight.tolist() == [[-2.0, -1.0, 0.0, 1.0]]


def test_fp16_scales_are_the_fp32_scales_rounded_and_the_codes_fit_them():
    w = weight(seed=3, rows=64, cols=256)
    full, half = (compress(w, IntNConfig(8, scale_dtype=d)) for d in ("fp32", "fp16"))
    assert torch.equal(half.parts["scale"], full.parts["scale"].half())
    # the codes are chosen on the stored scale: rounding to nearest on it, none moved
    scale = half.parts["scale"].float()
    assert torch.equal(signed_codes(half), torch.round(w / scale).clamp(-127, 127) + 0.0)


@pytest.mark.parametrize("grid", INT_GRIDS)
@pytest.mark.parametrize("bits", [2, 3])
def test_mse_and_gptq_work_on_each_grid_and_never_lose_to_its_max_and_nearest(grid, bits):
    generator = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 32, generator=generator)
    x = torch.randn(200, 32, generator=generator) @ torch.randn(32, 32, generator=generator)
    moment = second_moment(x)

    def errors(**options):
        config = IntNConfig(bits, int_grid=grid, **options)
        compressed = compress(w, config, moment)
        lo, hi = signed_range(config, row_zero(compressed))
        codes = signed_codes(compressed)
        assert bool(((codes >= lo) & (codes <= hi)).all())
        return weighted_row_errors(w - compressed.weight, moment)

    plain = errors()
    mse = errors(int_scale="mse")
    gptq = errors(int_scale="mse", quantizer="gptq")
    assert bool((mse <= plain + 1e-12).all()) and bool((gptq <= mse + 1e-12).all())
    assert float(gptq.sum()) < float(plain.sum())


def test_the_cli_names_match_the_registry_and_reach_the_configs():
    from compression.integer import INT_GRIDS

    assert list(cli.INT_GRID_NAMES) == list(INT_GRIDS)
    assert list(cli.SCALE_DTYPE_NAMES) == list(SCALE_DTYPES)
    assert make_config("int3", int_grid="affine", scale_dtype="fp16") == IntNConfig(
        3, int_grid="affine", scale_dtype="fp16"
    )
    assert IntNConfig(3, int_grid="affine", scale_dtype="fp16").describe() == (
        "int3(per-row affine, fp16 scales)"
    )
    for bad in ({"int_grid": "uneven"}, {"scale_dtype": "fp8"}, {"bits": 9}):
        with pytest.raises(ValueError):
            IntNConfig(**bad)


def test_a_grid_has_a_method_name_of_its_own_and_a_run_names_its_methods_so():
    from train_evaluate.config.compressions import compression_configs
    from train_evaluate.config.run_options import RunOptions

    assert make_config("int4-affine", int_grid="full").int_grid == "affine"  # the name wins
    assert method_of(IntNConfig(3, int_grid="full")) == "int3-full"
    assert method_of(IntNConfig(3)) == "int3"
    given = RunOptions(methods=("int3", "int4-full"))
    assert list(compression_configs(given)) == ["int3", "int4-full"]
    # --int-grid moves a plain width onto its grid, and the run names it by that grid
    affine = replace(given, int_grid="affine")
    assert list(compression_configs(affine)) == ["int3-affine", "int4-full"]


def test_a_bit_budget_chooses_each_layers_grid():
    """Both grids of a width are options of every layer, each priced with what it stores (the
    affine one its zero points too), and the budgeted model stores what the solver counted."""
    from tests.test_bits import small_setup
    from train_evaluate.search.sweep import SweepConfig
    from train_evaluate.training import budget

    setup = small_setup(include_bias=False)
    grids = {"int2": make_config("int2"), "int2-affine": make_config("int2-affine")}
    sweep = SweepConfig(init="svd_init")
    options = budget.measure_options(setup, grids, (0,), sweep)
    for info, layer in zip(setup.layers, options, strict=True):
        bits = {c.method: c.bits for c in layer}
        assert bits["int2-affine"] - bits["int2"] == 2 * info.shape[0]  # 2-bit zero points
    roomy = sum(max(c.bits for c in layer) for layer in options)
    solved = budget.allocate(setup, grids, (0,), setup.template.model_bits(roomy), sweep,
                             options=options)  # fmt: skip
    # with room for anything, each layer takes its less sensitive grid
    assert [c.method for c in solved.chosen] == [
        min(layer, key=lambda c: c.sensitivity).method for layer in options
    ]
    method = setup.planned_method(solved.layer_plan("budget", "fp16"), grids)
    priced = setup.accounting(method).per_layer(0)
    assert sum(p.stored_bits for _, _, p in priced) == solved.allocation.bits
