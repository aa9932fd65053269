"""Asymmetric calibration (``--calibration asymmetric``): layer k's act-aware init fits the
uncompressed network's outputs X W^T on the inputs X~ that the compressed layers before it
produce, through the cross-moment X^T X~ of clean and perturbed inputs (``lora.inits``,
``lora.calibration``). Checked against direct least-squares solves and forward hooks, on
chains of Linear and Conv2d layers; the default stays the symmetric fit it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import compress, make_config
from lora import LoraConfig, calibrate_sequentially
from lora.calibration import CrossMomentAccumulator, compress_sequentially
from lora.inits import DEFAULT_FIT, RIDGE, FitConfig, act_svd_init, output_target
from tests.conftest import run_driver, run_folder
from tests.test_network import RESNET, resnet_weights  # noqa: F401 (a fixture)

INT2 = make_config("int2")  # coarse enough that layer k's inputs move well away from the clean


def linear_chain() -> tuple[nn.Module, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(),
                          nn.Linear(10, 6))  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval(), [torch.randn(40, 12, generator=generator) for _ in range(3)]


def conv_chain() -> tuple[nn.Module, list[torch.Tensor]]:
    # 6x6 maps: 36 positions per image, under the 64 a moment keeps, so every row counts
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3, padding=1),
                          nn.Tanh(), nn.Conv2d(6, 5, 1))  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.4)
    return model.eval(), [torch.randn(6, 3, 6, 6, generator=generator) for _ in range(2)]


CHAINS = {"linear": linear_chain, "conv": conv_chain}
NAMES = ["0", "2", "4"]


def full_rank(name: str, module: nn.Module) -> LoraConfig:
    return LoraConfig(r=min(module.weight.flatten(1).shape), lora_alpha=8, init="act_svd_init")


def rank(r: int):
    return lambda name, module: LoraConfig(r=min(r, *module.weight.flatten(1).shape),
                                           lora_alpha=8, init="act_svd_init")  # fmt: skip


def calibrated(model, batches, config_for, **options):
    model = copy.deepcopy(model)
    targets = dict.fromkeys(NAMES, INT2)
    return model, calibrate_sequentially(model, targets, config_for, batches, **options)


def rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight matrix multiplies, float64: input vectors or unfolded patches."""
    x = x.double()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def inputs_of(model: nn.Module, name: str, batches, geometry: nn.Module) -> torch.Tensor:
    """Layer ``name``'s input rows over every batch (unfolded as ``geometry``, the dense layer,
    does), taken by a forward hook in float64."""
    module = model.get_submodule(name)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(rows(geometry, args[0])))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


def effective(adapter) -> torch.Tensor:
    """W_c + s B A as the out x in*kh*kw matrix, float64."""
    b = adapter.lora_B.detach().double().flatten(1)
    a = adapter.lora_A.detach().double().flatten(1)
    return adapter.base_layer.weight.detach().double().flatten(1) + adapter.scaling * b @ a


def output_error(m: torch.Tensor, x_tilde, x, weight) -> float:
    return torch.linalg.norm(x_tilde @ m.T - x @ weight.T).item()


@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_asymmetric_fit_is_the_least_squares_fit_of_the_clean_outputs(chain):
    """At full rank, layer k's W_c + L solves min ||X~ M^T - X W^T|| (X: its clean inputs, X~:
    the inputs the compressed and adapted layers before it produce, at rank 2 so that they
    differ from X), ridged towards W as the moment is ridged: equal to torch.linalg.lstsq on
    the same rows with the ridge's rows appended, and as good as the plain lstsq solve."""
    model, batches = CHAINS[chain]()
    for name in NAMES[1:]:

        def config_for(layer: str, module: nn.Module, name=name) -> LoraConfig:
            return (full_rank if layer == name else rank(2))(layer, module)

        adapted, results = calibrated(model, batches, config_for, asymmetric=True)
        dense = model.get_submodule(name)
        weight = dense.weight.detach().double().flatten(1)
        x = inputs_of(model, name, batches, dense)  # the uncompressed network
        x_tilde = inputs_of(adapted, name, batches, dense)  # the compressed, adapted prefix
        got = effective(results[name][0])
        eigenvalues = torch.linalg.eigvalsh(x_tilde.T @ x_tilde / len(x_tilde)).clamp_min(0)
        ridge = torch.sqrt(RIDGE * eigenvalues.mean() * len(x_tilde))
        eye = torch.eye(weight.shape[1], dtype=torch.float64)
        stacked = torch.cat([x_tilde, ridge * eye])
        wanted = torch.cat([x @ weight.T, ridge * weight.T])
        solved = torch.linalg.lstsq(stacked, wanted, driver="gelsd").solution.T
        torch.testing.assert_close(got, solved, rtol=0, atol=2e-5 * solved.abs().max().item())
        plain = torch.linalg.lstsq(x_tilde, x @ weight.T, driver="gelsd").solution.T
        error = output_error(got, x_tilde, x, weight)
        assert error <= 1.001 * output_error(plain, x_tilde, x, weight)
        # and the correction is real: W itself on X~ leaves a larger output error
        assert error < 0.9 * output_error(weight, x_tilde, x, weight)


@pytest.mark.parametrize("strength, ridge", [(0.25, 1e-2), (0.0, 1e-4), (0.6, 1.0)])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_weighted_asymmetric_fit_solves_its_blended_least_squares(chain, strength, ridge):
    """With ``FitConfig(ridge, asymmetric_strength=s)``, layer k's full-rank W_c + L solves
    min s ||X~ M^T - X W^T||^2 + (1 - s) ||X~ (M - W)^T||^2 + lam N ||M - W||^2, lam = ridge x
    the mean eigenvalue of X~'s moment: torch.linalg.lstsq on the three blocks of rows stacked
    gives the same M. s = 0 is W itself (the layer's own outputs on X~)."""
    model, batches = CHAINS[chain]()
    fit = FitConfig(ridge=ridge, asymmetric_strength=strength)
    for name in NAMES[1:]:

        def config_for(layer: str, module: nn.Module, name=name) -> LoraConfig:
            return (full_rank if layer == name else rank(2))(layer, module)

        adapted, results = calibrated(model, batches, config_for, asymmetric=True, fit=fit)
        dense = model.get_submodule(name)
        weight = dense.weight.detach().double().flatten(1)
        x = inputs_of(model, name, batches, dense)
        x_tilde = inputs_of(adapted, name, batches, dense)
        got = effective(results[name][0])
        eigenvalues = torch.linalg.eigvalsh(x_tilde.T @ x_tilde / len(x_tilde)).clamp_min(0)
        lam = torch.sqrt(ridge * eigenvalues.mean() * len(x_tilde))
        eye = torch.eye(weight.shape[1], dtype=torch.float64)
        clean, own = strength**0.5, (1 - strength) ** 0.5
        stacked = torch.cat([clean * x_tilde, own * x_tilde, lam * eye])
        wanted = torch.cat([clean * x @ weight.T, own * x_tilde @ weight.T, lam * weight.T])
        solved = torch.linalg.lstsq(stacked, wanted, driver="gelsd").solution.T
        torch.testing.assert_close(got, solved, rtol=0, atol=2e-5 * solved.abs().max().item())
        if strength == 0:
            torch.testing.assert_close(got, weight, rtol=0, atol=2e-5 * weight.abs().max().item())


@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_large_ridge_makes_the_act_aware_fit_the_plain_truncation(chain):
    """As the ridge grows, C + ridge x mean(eig C) x I tends to a multiple of I and the whitened
    truncation to the plain one: act_svd_init with ridge 1e9 gives svd_init's W_c + B @ A, layer
    by layer; with the default ridge they differ."""
    model, batches = CHAINS[chain]()

    def products(init: str, fit: FitConfig = DEFAULT_FIT) -> dict[str, torch.Tensor]:
        def config_for(name: str, module: nn.Module) -> LoraConfig:
            return LoraConfig(r=2, lora_alpha=8, init=init)

        # every layer sees clean inputs (not sequential): the same residuals for both inits
        _, results = calibrated(model, batches, config_for, sequential=False, fit=fit)
        return {name: effective(adapter) for name, (adapter, _) in results.items()}

    plain = products("svd_init")
    wide = products("act_svd_init", FitConfig(ridge=1e9))
    default = products("act_svd_init")
    for name in NAMES:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(wide[name], plain[name], rtol=0, atol=1e-5 * scale)
        assert (default[name] - plain[name]).abs().max().item() > 1e-2 * scale


@pytest.mark.parametrize("chain", list(CHAINS))
def test_at_a_low_rank_the_asymmetric_fit_has_no_larger_output_error(chain):
    """For the same rank, W_c and perturbed inputs X~, the asymmetric adapter's output error
    ||X~ (W_c + L)^T - X W^T|| is at most the symmetric adapter's, layer by layer."""
    model, batches = CHAINS[chain]()
    adapted, asymmetric = calibrated(model, batches, rank(2), asymmetric=True)
    improved = 0
    for name in NAMES[1:]:
        weight = model.get_submodule(name).weight.detach().double().flatten(1)
        x = inputs_of(model, name, batches, model.get_submodule(name))
        x_tilde = inputs_of(adapted, name, batches, model.get_submodule(name))
        adapter, context = asymmetric[name]
        # the symmetric fit of the same layer on the same X~: the context without G
        symmetric = copy.deepcopy(context)
        symmetric.cross_moment = None
        for cached in ("target", "whitening"):
            symmetric.__dict__.pop(cached, None)
        plain = copy.deepcopy(adapter)  # the same base W_c (rtn: W_c = C(W) either way)
        act_svd_init(plain, symmetric, None, None)
        ours = output_error(effective(adapter), x_tilde, x, weight)
        theirs = output_error(effective(plain), x_tilde, x, weight)
        assert ours <= theirs * (1 + 1e-6)
        improved += ours < 0.99 * theirs
    assert improved >= 1


@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_moments_are_those_of_the_clean_and_the_perturbed_inputs(chain):
    """C~ = X~^T X~ / N from the compressed prefix and G = X^T X~ / N with X from the
    uncompressed network, as forward hooks see them in float64; the symmetric pass measures
    the same C~ on the same prefix."""
    model, batches = CHAINS[chain]()
    adapted, results = calibrated(model, batches, rank(2), asymmetric=True)
    for name in NAMES:
        x = inputs_of(model, name, batches, model.get_submodule(name))
        x_tilde = inputs_of(adapted, name, batches, model.get_submodule(name))
        context = results[name][1]
        torch.testing.assert_close(context.moment, x_tilde.T @ x_tilde / len(x), rtol=1e-10,
                                   atol=1e-12)  # fmt: skip
        torch.testing.assert_close(context.cross_moment, x.T @ x_tilde / len(x), rtol=1e-10,
                                   atol=1e-12)  # fmt: skip
    # the first layer's inputs are the images themselves: nothing to correct
    assert torch.equal(results["0"][1].cross_moment, results["0"][1].moment)
    assert not torch.allclose(results["4"][1].cross_moment, results["4"][1].moment)


def test_clean_and_perturbed_rows_are_taken_at_the_same_positions():
    """With fewer positions kept than a map has, both inputs keep the same ones: on equal
    inputs the cross-moment is the moment, bit for bit, and the moment is the one a symmetric
    accumulator (same seed) measures."""
    from lora.calibration import MomentAccumulator

    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    paired = CrossMomentAccumulator(conv, positions=7)
    paired.update(x, x)
    alone = MomentAccumulator(conv, positions=7)
    alone.update(x)
    assert paired.rows == alone.rows == 5 * 7
    assert torch.equal(paired.cross_moment(), paired.moment())
    assert torch.equal(paired.moment(), alone.moment())


@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_default_is_the_symmetric_fit(chain):
    """No option and an explicit ``asymmetric=False`` give the same adapters and bases, bit for
    bit, with no cross-moment; asymmetric gives other adapters."""
    model, batches = CHAINS[chain]()
    _, default = calibrated(model, batches, rank(2))
    _, symmetric = calibrated(model, batches, rank(2), asymmetric=False)
    _, asymmetric = calibrated(model, batches, rank(2), asymmetric=True)
    for name in NAMES:
        one, two = default[name][0].state_dict(), symmetric[name][0].state_dict()
        assert one.keys() == two.keys()
        assert all(torch.equal(one[key], two[key]) for key in one)
        assert default[name][1].cross_moment is None
    assert not torch.equal(default["4"][0].lora_B, asymmetric["4"][0].lora_B)


def test_asymmetric_gptq_rounds_towards_the_clean_outputs():
    """The compressor-only row: asymmetric GPTQ lowers the last layer's output error against
    the uncompressed network's outputs, and symmetric is the default."""
    model, batches = linear_chain()
    gptq = make_config("int2", quantizer="gptq")
    targets = dict.fromkeys(NAMES, gptq)
    compressed = {}
    for asymmetric in (False, True, None):
        copied = copy.deepcopy(model)
        options = {} if asymmetric is None else {"asymmetric": asymmetric}
        compress_sequentially(copied, targets, batches, **options)
        compressed[asymmetric] = copied
    with torch.no_grad():
        clean = torch.cat([model(b) for b in batches])
        errors = {
            key: torch.linalg.norm(torch.cat([m(b) for b in batches]) - clean).item()
            for key, m in compressed.items()
        }
    assert errors[True] < errors[False]
    assert errors[None] == errors[False]


def test_asymmetric_gptq_at_strength_zero_rounds_the_layers_own_weight():
    """``compress_sequentially`` takes the strength: at s = 0 the target is W, so asymmetric
    GPTQ stores the symmetric W_c; at s = 1 another."""
    model, batches = linear_chain()
    targets = dict.fromkeys(NAMES, make_config("int2", quantizer="gptq"))
    codes = {}
    for key, options in {
        "symmetric": {},
        "zero": {"asymmetric": True, "fit": FitConfig(asymmetric_strength=0.0)},
        "full": {"asymmetric": True},
    }.items():
        copied = copy.deepcopy(model)
        compress_sequentially(copied, targets, batches, **options)
        codes[key] = torch.cat([copied.get_submodule(n).weight.flatten() for n in NAMES])
    assert torch.equal(codes["zero"], codes["symmetric"])
    assert not torch.equal(codes["full"], codes["symmetric"])


def test_a_group_with_silent_inputs_keeps_its_weight():
    """A depthwise conv's channel whose inputs are all zero has a zero moment and cross-moment:
    its rows of the asymmetric target are W's (finite), the other groups' are fitted."""
    generator = torch.Generator().manual_seed(0)
    groups, width = 3, 4
    weight = torch.randn(groups * 2, width, generator=generator)
    x = torch.randn(50, groups, width, generator=generator, dtype=torch.float64)
    x[:, 1] = 0  # the second group never sees an input
    x_tilde = x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    x_tilde[:, 1] = 0
    moment = torch.einsum("ngi,ngj->gij", x_tilde, x_tilde) / len(x)
    cross = torch.einsum("ngi,ngj->gij", x, x_tilde) / len(x)
    target = output_target(weight, moment, cross)
    assert torch.isfinite(target).all()
    torch.testing.assert_close(target[2:4], weight[2:4].double())
    assert not torch.allclose(target[:2], weight[:2].double(), atol=1e-3)


def test_asymmetric_needs_the_sequential_pass():
    model, batches = linear_chain()
    with pytest.raises(ValueError, match="needs sequential=True"):
        calibrated(model, batches, rank(2), asymmetric=True, sequential=False)


# ------------------------------------------------------------------------------ the driver


def test_the_fc_study_refuses_asymmetric_in_one_line(tmp_path, image_folder, capsys):
    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, "--data-dir", image_folder, "--model", "test_efficientnet",
        "--calibration", "asymmetric", "--results-dir", results,
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--calibration asymmetric" in lines[0] and not results.exists()


def test_an_asymmetric_run_is_recorded_and_named_apart(
    tmp_path,
    image_folder,
    resnet_weights,  # noqa: F811 (the fixture imported above)
    shared_cache,
    capsys,
):
    results = tmp_path / "results"
    common = [
        "--model", RESNET, "--weights", resnet_weights, "--data-dir", image_folder,
        "--layers", "layer4.*", "--methods", "int4", "--ranks", "2", "--trials", "1",
        "--epochs", "0", "--init", "act_svd_init", "--calib-images", "4",
        "--cache-dir", shared_cache,
    ]  # fmt: skip
    code, _, err = run_driver(capsys, *common, "--calibration", "asymmetric",
                              "--results-dir", results)  # fmt: skip
    assert code == 0, err
    out = run_folder(results, "act_svd_init_layers-layer4_asymmetric")
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["network"]["calibration"] == "asymmetric"
    # the default into that folder is another configuration: refused in one line
    code, _, err = run_driver(capsys, *common, "--out", out)
    assert code == 2 and "network" in err.strip().splitlines()[-1], err


def test_where_lapack_cannot_diagonalise_a_moment_the_shifted_one_gives_the_same_fits(
    monkeypatch,
):
    """LAPACK's eigh can fail to converge on a moment with hundreds of equal eigenvalues (seen
    on a layer whose inputs were zero in 815 of 864 channels on 8 small calibration images;
    which matrices fail depends on the LAPACK build). The fits then decompose the moment plus
    a small multiple of I and take the shift back off: the same target and whitening."""
    from lora.inits import InitContext

    generator = torch.Generator().manual_seed(0)
    inputs = torch.zeros(12, 40, dtype=torch.float64)
    inputs[:, :9] = torch.randn(12, 9, generator=generator, dtype=torch.float64).relu()
    perturbed = inputs + 0.05 * torch.randn(12, 40, generator=generator, dtype=torch.float64)
    moment, cross = perturbed.T @ perturbed / 12, inputs.T @ perturbed / 12
    weight = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    context = InitContext(weight, compress(weight, make_config("int2")), moment=moment)
    expected = output_target(weight, moment, cross), context.whitening

    real = torch.linalg.eigh

    def fails_once(matrix):  # LAPACK's refusal, on the first call of each fit
        if not failed:
            failed.append(matrix)
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fails_once)
    failed: list = []
    target = output_target(weight, moment, cross)
    failed.clear()
    whitening = InitContext(weight, compress(weight, make_config("int2")), moment=moment).whitening
    assert failed  # both fits went through the refusal
    torch.testing.assert_close(target, expected[0], rtol=1e-9, atol=0)
    for found, wanted in zip(whitening, expected[1], strict=True):
        torch.testing.assert_close(found, wanted, rtol=1e-9, atol=1e-9 * float(wanted.abs().max()))
