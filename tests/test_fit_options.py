"""``--fit-ridge`` and ``--asymmetric-strength`` (``lora.inits.FitConfig``) through the driver:
the ridge reaches the classifier's act-aware fit, both are recorded in run.json, and values
that are out of range or that no fit would read are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_driver, run_folder


def adapter_product(folder, rank: int) -> torch.Tensor:
    tensors = load_file(folder / "checkpoints" / f"quant=int2_r={rank}.safetensors")
    (b,) = [v for k, v in tensors.items() if k.endswith("lora_B")]
    (a,) = [v for k, v in tensors.items() if k.endswith("lora_A")]
    return b.double() @ a.double()


def test_the_fit_ridge_reaches_the_classifiers_fit(tmp_path, demo_cache, capsys):
    """act_svd_init with --fit-ridge 1e9 whitens by a multiple of I: its adapter is svd_init's
    (without the ridge reaching the fit it would be the default act_svd_init, another one);
    run.json records the fit, and the default into that folder is refused as another config."""
    common = ["--epochs", "0", "--methods", "int2", "--ranks", "4", "--cache-dir", demo_cache]
    code, _, err = run_driver(capsys, *common, "--init", "svd_init", "--results-dir", tmp_path)
    assert code == 0, err
    code, _, err = run_driver(capsys, *common, "--init", "act_svd_init", "--fit-ridge", "1e9",
                              "--results-dir", tmp_path)  # fmt: skip
    assert code == 0, err
    wide = run_folder(tmp_path, "act_svd_init")
    plain = adapter_product(run_folder(tmp_path, "svd_init"), 4)
    torch.testing.assert_close(
        adapter_product(wide, 4), plain, rtol=0, atol=1e-4 * plain.abs().max().item()
    )
    config = json.loads((wide / "run.json").read_text())["config"]
    assert config["fit"] == {"ridge": 1e9, "asymmetric_strength": 1.0}
    code, _, err = run_driver(capsys, *common, "--init", "act_svd_init", "--out", wide)
    assert code == 2 and "fit" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize(
    "options, says",
    [
        (["--init", "act_svd_init", "--fit-ridge", "0"], "--fit-ridge must be a positive"),
        (["--init", "act_svd_init", "--fit-ridge", "nan"], "--fit-ridge must be a positive"),
        (["--init", "svd_init", "--fit-ridge", "0.1"], "--init svd_init fits without it"),
        (["--init", "act_svd_init", "--asymmetric-strength", "0.5"], "add --calibration"),
        (["--init", "act_svd_init", "--asymmetric-strength", "1.5"], "must be in [0, 1]"),
    ],
)
def test_fit_options_that_cannot_work_are_refused_in_one_line(
    options, says, tmp_path, demo_cache, capsys
):
    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, *options, "--epochs", "0", "--results-dir", results, "--cache-dir", demo_cache
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert says in lines[0] and not results.exists()
