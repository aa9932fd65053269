"""Inputs a hostile user gave the tools: an edited whole-network checkpoint, junk run folders,
a report pointed at an empty or missing database, --layers patterns whose folder names
collided, and compression options that no chosen method uses. Each gets one clear line (or a
warning), never a traceback or a file changed behind the user's back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compression import make_config
from tests.test_workers import postgres as postgres_server  # noqa: F401 (a fixture)
from train_evaluate import compare
from train_evaluate.inputs import images as image_cache
from train_evaluate.inputs import selection as layer_selection
from train_evaluate.outputs import report
from train_evaluate.outputs.checkpoint import CheckpointError, write_packed
from train_evaluate.outputs.network_checkpoint import install_network, read_packed_network
from train_evaluate.outputs.run_folder import FORMAT
from train_evaluate.outputs.summary import log as summary_log
from train_evaluate.runtime.files import digest
from train_evaluate.search.sweep import SweepConfig
from train_evaluate.training import network

# ------------------------------------------------------ 1. an edited whole-network checkpoint

RESNET = "test_resnet"
LAYERS = ["layer1.*"]  # two 3x3 convs: geometry that an edit can change without the shape


def bare_resnet() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(RESNET, pretrained=False).eval()


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory) -> tuple[Path, Path]:
    """(weights file, whole-network checkpoint over ``layer1``'s convs, int4, rank 2)."""
    folder = tmp_path_factory.mktemp("network")
    model = bare_resnet()
    weights = folder / "test_resnet.pth"
    torch.save(model.state_dict(), weights)
    from train_evaluate.inputs.backbone import eval_transform

    mean, std = image_cache.normalisation(eval_transform(model))
    images = image_cache.ImageModel(model, mean, std).eval().requires_grad_(False)
    names = layer_selection.select_layers(model, LAYERS)
    calibration = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    infos = layer_selection.describe_layers(model, names, images.preprocess(calibration[:1]))
    method = network.NetworkMethod.create("int4", make_config("int4"), images, infos, calibration)
    adapted = method.adapted(2, 16, SweepConfig(init="paper_init"), seed=1)
    checkpoint = folder / "network.safetensors"
    write_packed(checkpoint, adapted.adapters(), "fp32", {"model": RESNET})
    return weights, checkpoint


def edited(source: Path, target: Path, layer: str, field: str, value) -> Path:
    """``source`` with one conv geometry field of ``layer`` changed and its digest recomputed:
    a file that passes the sha256 check."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    info = json.loads(metadata["checkpoint"])
    info["layers"][layer]["conv"][field] = value
    text = json.dumps(info)
    metadata.update(checkpoint=text, sha256=digest(tensors, text))
    save_file(tensors, str(target), metadata=metadata)
    return target


EDITS = {"padding": [2, 2], "stride": [2, 2], "dilation": [2, 2]}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_conv_geometry_is_refused_naming_the_layer_and_the_field(
    field, resnet_files, tmp_path
):
    _, checkpoint = resnet_files
    layer = "layer1.0.conv1"
    path = edited(checkpoint, tmp_path / "edited.safetensors", layer, field, EDITS[field])
    packed = read_packed_network(path)  # the file itself is consistent: only the model differs
    with pytest.raises(CheckpointError, match=rf"{layer} has {field} 2x2; the model's {layer}"):
        install_network(bare_resnet(), packed)
    install_network(bare_resnet(), read_packed_network(checkpoint))  # the unedited file fits


def test_evaluate_refuses_an_edited_network_checkpoint_in_one_line(
    resnet_files, image_folder, tmp_path, capsys
):
    from train_evaluate.evaluate import main

    weights, checkpoint = resnet_files
    path = edited(checkpoint, tmp_path / "edited.safetensors", "layer1.0.conv2", "padding", [2, 2])
    cache = tmp_path / "cache"
    code = main(["--checkpoint", str(path), "--weights", str(weights), "--data-dir",
                 str(image_folder), "--all", "--cache-dir", str(cache)])  # fmt: skip
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "layer1.0.conv2" in lines[0] and "padding" in lines[0]
    # refused before the image pass: no cache was written for a checkpoint that cannot run
    assert not cache.exists() or not any(cache.iterdir())


# ----------------------------------------------------- 2, 6. run folders with junk configs


def write_run(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": FORMAT, "config": config}))
    rows = [
        {"quant": "int1", "lora_rank": rank, "evaluation": accuracy, "ratio": ratio,
         "init": "svd_init", "test_images": 100}
        for rank, accuracy, ratio in (("original", 90.0, 1.0), ("2", 70.0, 5.0))
    ]  # fmt: skip
    report.write_evaluation(folder, report.evaluation_frame(rows))


JUNK_CONFIGS = {
    "weights a list": {"model": "a", "data": "fx", "weights": ["w"]},
    "model a list": {"model": ["a"], "data": "fx", "weights": "w"},
    "data a number": {"model": "a", "data": 7, "weights": "w"},
    "empty config": {},
}


@pytest.mark.parametrize("case", list(JUNK_CONFIGS))
def test_a_run_folder_with_a_junk_config_is_left_out_and_the_good_runs_summarised(
    case, tmp_path, caplog
):
    write_run(tmp_path / "a" / "X" / "svd_init", {"model": "a", "data": "fx", "weights": "w"})
    write_run(tmp_path / "junk", JUNK_CONFIGS[case])
    with caplog.at_level(logging.WARNING, logger=summary_log.name):
        assert compare.main(["--results-dir", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(summary["run"]) == {"a/X/svd_init"}
    assert sorted(p.name for p in tmp_path.glob("summary*.png")) == ["summary_a_X.png"]
    warnings = [r.getMessage() for r in caplog.records if "junk" in r.getMessage()]
    assert len(warnings) == 1 and "left out" in warnings[0], caplog.text
    assert len(warnings[0].splitlines()) == 1


# ------------------------------------------------- 3. report.py leaves a wrong storage alone


@pytest.mark.parametrize("kind", ["empty file", "no file"])
def test_report_refuses_a_storage_that_is_not_one_and_leaves_it_unchanged(kind, tmp_path, capsys):
    from train_evaluate.report import main

    database = tmp_path / "empty.db"
    if kind == "empty file":
        database.write_bytes(b"")
    before = sorted(tmp_path.iterdir())
    code = main(["--storage", f"sqlite:///{database}", "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before  # no file made, none beside it, no report
    if kind == "empty file":
        assert database.read_bytes() == b""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(database) in lines[0]


def test_report_refuses_a_postgresql_database_without_optunas_tables_and_makes_none(
    postgres_server,  # noqa: F811 (the fixture imported above)
    tmp_path,
    capsys,
):
    import sqlalchemy

    postgres = postgres_server  # a fresh server (skipped where PostgreSQL is not installed)

    from train_evaluate.report import main

    code = main(["--storage", postgres, "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    engine = sqlalchemy.create_engine(postgres)
    try:
        tables = sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert tables == []  # RDBStorage would have made Optuna's tables
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not an Optuna storage" in lines[0], err
    assert not (tmp_path / "report").exists()


def test_report_still_reads_a_storage_that_is_one(tmp_path, capsys):
    import optuna

    from train_evaluate.report import main

    database = tmp_path / "sweep.db"
    optuna.storages.RDBStorage(f"sqlite:///{database}").engine.dispose()
    before = database.read_bytes()
    code = main(["--storage", f"sqlite:///{database}", "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    # past the check: the storage opens, and holds no finished sweep
    assert code == 2 and "holds no finished sweep" in err, err
    assert database.read_bytes() == before


# ------------------------------------------------ 4. every selection its own folder name


def test_layer_selections_that_slug_alike_get_different_folder_names():
    from train_evaluate.config.network_plan import selection_name

    collided = [["*", "?", "**", "*.*"], ["blocks.*.mlp.fc*", "blocks.?.mlp.fc*"]]
    for patterns in collided:
        names = [selection_name(p) for p in patterns]
        assert len(set(names)) == len(names), names
    # selections their slug names exactly keep the names their run folders have today
    assert selection_name("all") == "all"
    assert selection_name("blocks.1.*") == "blocks.1"
    assert selection_name("layer1.0.conv1") == "layer1.0.conv1"
    assert selection_name("blocks.1*") != selection_name("blocks.1.*")


# --------------------------------------------- 5. options that no chosen method uses


def plan_log(tmp_path: Path, caplog, *options: str) -> list[str]:
    """The warnings the driver's plan logs for ``options`` (the offline demo)."""
    from train_evaluate.config.options import parse_args
    from train_evaluate.config.plan import log, plan_run

    args = parse_args(["--demo", "--results-dir", str(tmp_path / "results"), *options])
    with caplog.at_level(logging.WARNING, logger=log.name):
        plan_run(args)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


IGNORED = {
    "quantizer with sparse": (["--quantizer", "gptq", "--methods", "sparse"], "--quantizer"),
    "int scale with int1": (["--int-scale", "mse", "--methods", "int1"], "--int-scale"),
    "int1 scale with int4": (["--int1-scale", "tensor", "--methods", "int4"], "--int1-scale"),
    "block with int methods": (["--block", "1x16", "--methods", "int1", "int4"], "--block"),
    "keep with int methods": (["--keep", "max", "--methods", "int8"], "--keep"),
    "nm with sparse": (["--nm", "1:4", "--methods", "sparse"], "--nm"),
    "preset with int4": (["--preset", "seed-compat", "--methods", "int4"], "--preset"),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_an_option_no_chosen_method_uses_is_warned_about_in_one_line(case, tmp_path, caplog):
    options, flag = IGNORED[case]
    warnings = [w for w in plan_log(tmp_path, caplog, *options) if flag in w]
    assert len(warnings) == 1 and len(warnings[0].splitlines()) == 1, warnings
    methods = options[options.index("--methods") + 1 :]
    assert "ignored" in warnings[0] and f"--methods {' '.join(methods)}" in warnings[0]


def test_an_option_a_chosen_method_uses_is_not_warned_about(tmp_path, caplog):
    used = ["--quantizer", "gptq", "--int-scale", "mse", "--block", "1x16", "--nm", "1:4",
            "--preset", "seed-compat", "--methods", "sparse", "int4", "nm"]  # fmt: skip
    assert plan_log(tmp_path, caplog, *used) == []


# ------------------------------------------ 6. a whole-network run on the demo, pushed around

# The offline demo with every Linear selected: quick, and every whole-network option applies.
NETWORK_DEMO = ["--init", "svd_init", "--layers", "all", "--epochs", "0", "--ranks", "2",
                "--methods", "int2"]  # fmt: skip


def refusal(capsys, tmp_path: Path, cache: Path, *options: str) -> str:
    """The one error line the demo driver answers ``options`` with (exit 2, nothing written)."""
    from tests.conftest import run_driver

    results = tmp_path / "results"
    code, _, err = run_driver(
        capsys, *NETWORK_DEMO, "--results-dir", results, "--cache-dir", cache, *options
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))
    return lines[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_results_dir_that_cannot_be_made_is_refused_in_one_line(tmp_path, demo_cache, capsys):
    line = refusal(capsys, tmp_path, demo_cache, "--results-dir", "/proc/nope/x")
    assert "--results-dir /proc/nope/x" in line and "/proc" in line


@pytest.fixture
def tiny_disk(tmp_path):
    """A real file system of 160 kB (tmpfs), too small for the demo run's files; skipped where
    this process may not mount one."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_safetensors_file_on_a_full_disk_is_an_oserror_and_leaves_nothing(tiny_disk):
    import errno

    from train_evaluate.runtime.files import write_safetensors

    target = tiny_disk / "big.safetensors"
    with pytest.raises(OSError) as raised:
        write_safetensors(target, {"x": torch.zeros(1 << 18)})  # 1 MB
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(tiny_disk.iterdir()) == []


def test_a_full_disk_during_a_run_is_one_line_and_leaves_no_half_written_file(
    tiny_disk, own_demo_cache, capsys
):
    from tests.conftest import run_driver

    code, _, err = run_driver(
        capsys, *NETWORK_DEMO, "--results-dir", tiny_disk, "--cache-dir", own_demo_cache
    )
    errors = [line for line in err.splitlines() if not line.startswith("progress ")]
    assert code != 0 and len(errors) == 1 and "no space left on the device" in errors[0], err
    # no temporary left, no result file, and every file that is there is whole
    assert not [p for p in tiny_disk.rglob("*") if ".tmp" in p.name]
    assert not list(tiny_disk.rglob("evaluation.csv"))
    for path in tiny_disk.rglob("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--bits-budget", "5", "5.0000001", "4.9999999"], "both be the rows budget5"),
        (["--reconstruct", "block", "--reconstruct-lr", "inf"], "positive and finite"),
        (["--calibration", "asymmetric"], "--calibration asymmetric changes only"),
        (["--reconstruct-drop", "0.5"], "--reconstruct-drop is read by nothing in this run"),
        (["--reconstruct", "block", "--rounding-lr", "0.1"], "add --quantizer gptq-adaround"),
        (
            ["--reconstruct", "block", "--reconstruct-network-steps", "9"],
            "drop it, or use --reconstruct network",
        ),
        (
            ["--methods", "int1", "--quantizer", "adaround", "--reconstruct", "block"],
            "int1 takes the quantizer rtn or gptq, not 'adaround'",
        ),
    ],
)
def test_an_option_that_cannot_work_is_refused_before_any_work(
    options, says, tmp_path, demo_cache, capsys
):
    assert says in refusal(capsys, tmp_path, demo_cache, *options)


def test_more_calibration_images_or_a_larger_batch_than_there_are_is_said_and_recorded(
    tmp_path, caplog
):
    from train_evaluate.config.options import parse_args
    from train_evaluate.config.plan import log, plan_run

    args = parse_args([
        "--demo", *NETWORK_DEMO, "--results-dir", str(tmp_path), "--calib-images", "100000",
        "--reconstruct", "block", "--reconstruct-batch", "5000",
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=log.name):
        plan = plan_run(args)
    train = len(plan.source.ids) - sum(
        plan.fractions.sizes(len(plan.source.ids))[s] for s in ("val", "test")
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--calib-images 100000 is more than" in w for w in warnings), warnings
    assert any("--reconstruct-batch 5000 is more than" in w for w in warnings), warnings
    # what the run records is what it does: every train image, each step all of them
    assert plan.network.calib_images == train
    assert plan.network.reconstruction.batch_size == train


def test_the_help_names_the_int_methods_the_registry_has():
    from compression import list_methods
    from train_evaluate.config.cli import INT_METHODS
    from train_evaluate.config.compressions import uses_field

    assert list(INT_METHODS) == [m for m in list_methods() if uses_field(m, "int_scale")]
    assert [m for m in list_methods() if uses_field(m, "quantizer", "adaround")] == list(
        INT_METHODS
    )


def test_a_hand_edited_run_json_is_refused_naming_the_key_that_differs(
    tmp_path, own_demo_cache, capsys
):
    from tests.conftest import run_driver

    results = tmp_path / "results"
    args = [*NETWORK_DEMO, "--results-dir", results, "--cache-dir", own_demo_cache]
    assert run_driver(capsys, *args)[0] == 0
    (run_json,) = results.glob("*/*/*/run.json")
    recorded = json.loads(run_json.read_text())
    recorded["config"]["network"]["calib_images"] = 7
    run_json.write_text(json.dumps(recorded))
    code, _, err = run_driver(capsys, *args)
    assert code == 2 and "another network.calib_images (7 there, 512 here)" in err, err


def test_layers_csv_after_a_resume_equals_the_uninterrupted_run(tmp_path, own_demo_cache, capsys):
    """A run killed after its first rank's record leaves that record and nothing of the second
    rank that a resume would use; the resume reuses the first rank from records/."""
    from tests.conftest import run_driver

    results = tmp_path / "results"
    options = ["--ranks", "2", "4", "--reconstruct", "block", "--reconstruct-steps", "1"]
    args = [*NETWORK_DEMO, *options, "--results-dir", results, "--cache-dir", own_demo_cache]
    assert run_driver(capsys, *args)[0] == 0
    (folder,) = [p.parent for p in results.glob("*/*/*/run.json")]
    uninterrupted = pd.read_csv(folder / "layers.csv")
    assert uninterrupted["block"].notna().all()
    for name in ("evaluation.csv", "layers.csv", "records/int2_r4.json"):
        (folder / name).unlink()
    code, out, _ = run_driver(capsys, *args)
    assert code == 0 and "int2 r=2: finished already" in out
    pd.testing.assert_frame_equal(pd.read_csv(folder / "layers.csv"), uninterrupted)


def test_the_warning_for_an_unused_quantizer_lists_only_the_methods_that_take_it(tmp_path, caplog):
    options = ["--quantizer", "adaround", "--methods", "sparse"]
    (warning,) = [w for w in plan_log(tmp_path, caplog, *options) if "--quantizer" in w]
    assert "applies to --methods int2 ... int8 (every grid) only" in warning, warning
