"""A run's folder: one configuration per folder, finished ranks reused only when their files
verify, one-line errors for a damaged database or a full disk, progress without a terminal,
and a command line that answers before the heavy libraries load."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run_driver, run_folder
from tests.test_driver import tiny_args
from train_evaluate.outputs.network_checkpoint import read_packed

DRIVER = REPO / "train_evaluate" / "train_model.py"
# A one-method, one-rank demo run: a real digits classifier, about a second of training.
SMALL = ["--init", "svd_init", "--methods", "sparse", "--ranks", "2", "--trials", "2",
         "--epochs", "1"]  # fmt: skip


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file's hash, but SQLite's (reading a WAL database rewrites its files) and the lock."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(("optuna.sqlite3", ".lock"))
    }


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def small_args(folder: Path, demo_cache: Path) -> list[str]:
    return [*SMALL, "--out", str(folder / "run"), "--cache-dir", str(demo_cache),
            "--results-dir", str(folder / "results")]  # fmt: skip


@pytest.fixture(scope="module")
def finished_small_run(tmp_path_factory, demo_cache) -> Path:
    """A finished ``SMALL`` run, made once: each test takes its own copy (``small_run``)."""
    from train_evaluate.train_model import main

    folder = tmp_path_factory.mktemp("small-run")
    assert main(small_args(folder, demo_cache)) == 0
    return folder


@pytest.fixture
def small_run(finished_small_run, tmp_path, demo_cache) -> tuple[Path, list[str]]:
    """A finished ``SMALL`` run of this test's own, in ``tmp_path``: a copy of the one made
    for the module, which the driver takes for its own run (a damage test reuses it whole)."""
    shutil.copytree(finished_small_run, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run", small_args(tmp_path, demo_cache)


@pytest.mark.parametrize(
    "damage",
    ["delete checkpoint", "corrupt checkpoint", "delete png", "edit png", "edit record"],
)
def test_a_finished_rank_is_reused_only_when_its_files_verify(small_run, capsys, damage):
    out, args = small_run
    checkpoint = out / "checkpoints" / "quant=sparse_r=2.safetensors"
    png = out / "acc_quant=sparse_r=2.png"
    record = out / "records" / "sparse_r2.json"
    before = pd.read_csv(out / "evaluation.csv")
    if damage == "delete checkpoint":
        checkpoint.unlink()
    elif damage == "corrupt checkpoint":
        data = bytearray(checkpoint.read_bytes())
        data[-3] ^= 0xFF
        checkpoint.write_bytes(bytes(data))
    elif damage == "delete png":
        png.unlink()
    elif damage == "edit png":
        png.write_bytes(png.read_bytes() + b"\0")
    else:  # a plausible edit: the JSON stays valid, the number changes
        value = json.loads(record.read_text())
        value["test_acc"] += 1.0
        record.write_text(json.dumps(value))

    code, out_text, err = run_driver(capsys, *args)
    assert code == 0, err
    assert "running the rank again" in out_text
    assert "reusing its results" not in out_text
    # the rank's files are back, whole, and the CSV describes the file that exists
    after = pd.read_csv(out / "evaluation.csv")
    row = after[after["lora_rank"].astype(str) == "2"].iloc[0]
    assert checkpoint.stat().st_size == row["file_bytes"]
    assert read_packed(checkpoint).info["metrics"]["test_acc"] == pytest.approx(
        row["evaluation"], abs=1e-3
    )
    assert png.is_file()
    # seeded: rerunning the rank gives the numbers it gave the first time
    columns = ["evaluation", "file_evaluation", "best_epoch", "lr"]
    pd.testing.assert_frame_equal(before[columns], after[columns])
    # and a rerun on intact files reuses the rank
    code, out_text, _ = run_driver(capsys, *args)
    assert code == 0 and "reusing its results" in out_text


def test_another_configuration_is_refused_in_one_line_then_overwritten(small_run, capsys):
    out, args = small_run
    before = tree_digest(out)
    # (another search space, not another seed: the demo's classifier stays the cached one)
    code, _, err = run_driver(capsys, *args, "--alphas", "4")
    assert code == 2
    line = one_error_line(err)
    assert "another space" in line and "--overwrite" in line
    assert tree_digest(out) == before  # nothing in the folder changed

    code, _, err = run_driver(capsys, *args, "--alphas", "4", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["sweep"]["space"]["alphas"] == [4]
    # every file now belongs to the new configuration: no record of the old run is left
    assert sorted(p.name for p in (out / "records").iterdir()) == ["sparse_r2.json"]
    record = json.loads((out / "records" / "sparse_r2.json").read_text())
    assert record["best_params"]["lora_alpha"] == 4


def test_more_trials_or_ranks_extend_the_run_in_its_folder(small_run, capsys):
    out, args = small_run
    code, _, err = run_driver(capsys, *args, "--ranks", "2", "4", "--trials", "3")
    assert code == 0, err
    frame = pd.read_csv(out / "evaluation.csv")
    assert list(frame["lora_rank"].astype(str)) == ["original", "quantized", "2", "4"]


def test_a_folder_of_foreign_files_is_refused(tmp_path, demo_cache, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    code, _, err = run_driver(capsys, *SMALL, "--out", out, "--cache-dir", demo_cache,
                              "--results-dir", tmp_path / "results")  # fmt: skip
    assert code == 2 and "not a run of this tool" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "my notes\n"


def test_runs_of_other_models_and_data_get_their_own_folders(
    tmp_path, demo_cache, image_folder, tiny_weights, shared_cache, capsys
):
    """The README's ImageNet command after the demo, into the same results folder."""
    results = tmp_path / "results"
    demo_args = [*SMALL, "--epochs", "0", "--results-dir", results, "--cache-dir", demo_cache]
    assert run_driver(capsys, *demo_args)[0] == 0
    demo_folder = run_folder(results, "svd_init")
    before = tree_digest(demo_folder)
    args = tiny_args(image_folder, tiny_weights, results, shared_cache, "--init", "svd_init",
                     "--epochs", "0")  # fmt: skip
    code, _, err = run_driver(capsys, *args)
    assert code == 0, err
    folders = sorted(p.parent.relative_to(results) for p in results.glob("*/*/*/run.json"))
    assert [str(f) for f in folders] == [
        "digits_vit/digits/svd_init",
        f"test_vit/{image_folder.name}/svd_init",
    ]
    assert tree_digest(demo_folder) == before


def test_a_damaged_optuna_database_is_one_line(small_run, capsys):
    out, args = small_run
    (out / "optuna.sqlite3").write_bytes(b"this is not a database" * 100)
    for name in ("optuna.sqlite3-wal", "optuna.sqlite3-shm"):
        (out / name).unlink(missing_ok=True)
    code, _, err = run_driver(capsys, *args, "--ranks", "4")
    assert code == 1
    assert "optuna.sqlite3" in one_error_line(err)


def test_a_full_disk_is_one_line(tmp_path, demo_cache, capsys):
    """A real full file system: a 96 KiB tmpfs as the run folder (needs root to mount)."""
    out = tmp_path / "small-disk"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(out)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        code, _, err = run_driver(capsys, *SMALL, "--out", out, "--cache-dir", demo_cache,
                                  "--results-dir", tmp_path / "results")  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    assert code == 1
    line = one_error_line(err)
    assert "no space left" in line and "rerun" in line


def test_the_summary_goes_under_results_dir_only(tmp_path, demo_cache, capsys):
    parent = tmp_path / "elsewhere"
    results = tmp_path / "results"
    common = [*SMALL, "--epochs", "0", "--results-dir", results, "--cache-dir", demo_cache]
    assert run_driver(capsys, *common)[0] == 0
    assert run_driver(capsys, *common, "--init", "paper_init", "--out", parent / "run")[0] == 0
    # nothing beside a --out elsewhere; the summary under --results-dir holds its own runs
    assert sorted(p.name for p in parent.iterdir()) == ["run"]
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["run"]) == {"digits_vit/digits/svd_init"}


def test_a_results_dir_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    code, _, err = run_driver(capsys, "--results-dir", tmp_path / "a-file")
    assert code == 2 and "--results-dir" in one_error_line(err)


def test_progress_is_printed_per_trial_when_stderr_is_a_file(tmp_path, demo_cache, capsys):
    # (capsys's stderr is a file, not a terminal, as a redirected one is)
    code, _, err = run_driver(capsys, *SMALL, "--out", tmp_path / "run", "--cache-dir",
                              demo_cache, "--results-dir", tmp_path / "results")  # fmt: skip
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("progress ")]
    # two trials and one final model: one line each
    assert [line.split(" (")[0] for line in lines] == [f"progress {i}/3" for i in (1, 2, 3)]


def test_help_parses_before_torch_is_imported():
    code = (
        "import sys\n"
        "from train_evaluate.train_model import main\n"
        "assert main(['--help']) == 0\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported too early'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(default: 10)" in done.stdout and "examples:" in done.stdout


def test_the_names_the_help_lists_are_the_registries():
    from compression import PRESETS, list_methods
    from compression.binary import INT1_SCALES
    from compression.sparse import KEEP_RULES
    from lora import LORA_INITS
    from train_evaluate.config import cli
    from train_evaluate.outputs.checkpoint import ADAPTER_FORMATS
    from train_evaluate.training.training import OBJECTIVES

    assert list(cli.INIT_NAMES) == list(LORA_INITS)
    assert sorted(cli.METHOD_NAMES) == sorted(list_methods())
    assert list(cli.PRESET_NAMES) == list(PRESETS)
    assert list(cli.KEEP_NAMES) == list(KEEP_RULES)
    assert list(cli.INT1_SCALE_NAMES) == list(INT1_SCALES)
    assert list(cli.ADAPTER_DTYPE_NAMES) == list(ADAPTER_FORMATS)
    assert list(cli.OBJECTIVE_NAMES) == list(OBJECTIVES)


def test_offline_without_weights_is_one_fast_line(image_folder, tmp_path, capsys):
    from train_evaluate.config.plan import hub_reachable

    if hub_reachable():
        pytest.skip("the weights hub is reachable from here")
    code, _, err = run_driver(capsys, "--data-dir", image_folder, "--model", "test_vit",
                              "--results-dir", tmp_path / "results")  # fmt: skip
    assert code == 2 and "no internet" in one_error_line(err) and "--weights" in err
    assert not (tmp_path / "results").exists()


def test_tiny_or_class_disjoint_splits_are_flagged():
    import torch

    from data import split_warnings

    labels = torch.arange(10).repeat(50)  # 500 images, 10 classes
    order = torch.arange(500)
    sound = {"train": order[:300], "val": order[300:500], "test": order[300:500]}
    assert split_warnings(labels, sound) == []
    disjoint = {"train": order[labels < 5], "val": order[labels >= 5], "test": order[labels >= 5]}
    warnings = split_warnings(labels, disjoint)
    assert any("5 of the 5 classes in val have no train image" in w for w in warnings)
    assert any("in test" in w for w in warnings)
    small = {"train": order[:400], "val": order[400:432], "test": order[432:]}
    assert any("val has only 32 images" in w for w in split_warnings(labels, small))


def test_a_run_removes_the_temporaries_of_killed_runs(small_run, capsys):
    from tests.test_cache_trust import dead_writers_temporary

    out, args = small_run
    orphan = dead_writers_temporary(out / "checkpoints")
    code, text, _ = run_driver(capsys, *args)
    assert code == 0 and not orphan.exists()
    assert "removed 1 temporary files left by killed runs" in text


def test_the_packed_file_does_not_depend_on_where_data_and_weights_live(
    tmp_path, image_folder, tiny_weights, shared_cache, capsys
):
    """The checkpoint names weights and data by id, not by path: the same run with its inputs
    under a much longer path writes files of the same size."""
    deep = tmp_path / ("a-much-longer-folder-name" * 3) / "inputs"
    shutil.copytree(image_folder, deep / image_folder.name)  # copy2: same sizes and times
    deep_weights = deep / "weights" / tiny_weights.name
    deep_weights.parent.mkdir(parents=True)
    shutil.copy2(tiny_weights, deep_weights)
    sizes = []
    for data, weights, results in (
        (image_folder, tiny_weights, tmp_path / "r1"),
        (deep / image_folder.name, deep_weights, tmp_path / "r2"),
    ):
        args = tiny_args(data, weights, results, shared_cache, "--methods", "sparse",
                         "--ranks", "2", "--epochs", "0")  # fmt: skip
        code, _, err = run_driver(capsys, *args)
        assert code == 0, err
        folder = run_folder(results, "paper_init")
        checkpoint = folder / "checkpoints" / "quant=sparse_r=2.safetensors"
        sizes.append(checkpoint.stat().st_size)
        frame = pd.read_csv(folder / "evaluation.csv")
        assert frame["file_bytes"].dropna().tolist() == [checkpoint.stat().st_size]
    assert sizes[0] == sizes[1]


def test_config_from_a_finished_run_reproduces_it(small_run, tmp_path, capsys):
    from train_evaluate.outputs.report import TIMING_COLUMNS

    out, _ = small_run
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["options"]["methods"] == ["sparse"] and recorded["options"]["trials"] == 2
    # the same options from the file alone, into another folder (the command line overrides)
    again = tmp_path / "again"
    code, _, err = run_driver(capsys, "--config", out / "run.json", "--out", again)
    assert code == 0, err
    first = pd.read_csv(out / "evaluation.csv").drop(columns=TIMING_COLUMNS)
    second = pd.read_csv(again / "evaluation.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(first, second)
    assert json.loads((again / "run.json").read_text())["config"] == recorded["config"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"calib_imagez": 3}', "unknown option 'calib_imagez'"),
        ('{"format": "lora-compression-run/1", "config": {}}', "records no options"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "cannot read it as JSON"),
    ],
)
def test_a_config_that_is_not_one_is_refused_in_one_line(content, says, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(content)
    code, _, err = run_driver(capsys, "--config", config, "--results-dir", tmp_path / "results")
    assert code == 2 and says in one_error_line(err)
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------- options defined once


def test_the_parser_and_run_options_name_the_same_options():
    from train_evaluate.config.cli import build_parser
    from train_evaluate.config.run_options import RunOptions

    dests = {a.dest for a in build_parser()._actions} - {"help", "config"}
    assert dests == set(RunOptions.names())


def test_no_option_of_the_parser_sets_a_default_of_its_own():
    # RunOptions is the one place defaults are written: an add_argument(default=...) would be
    # a second one, which set_defaults silently overrides (or, for an option RunOptions lacks,
    # keeps)
    import ast
    import inspect

    from train_evaluate.config import cli

    tree = ast.parse(inspect.getsource(cli.build_parser))
    own = [
        ast.unparse(node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "add_argument"
        and any(k.arg == "default" for k in node.keywords)
    ]
    assert own == []


def test_every_default_the_help_states_is_the_one_the_run_takes():
    import re

    from train_evaluate.config.cli import build_parser
    from train_evaluate.config.run_options import RunOptions

    def same(text: str, value) -> bool:
        try:
            return float(text) == float(value)
        except (TypeError, ValueError):
            return text == str(value)

    defaults = RunOptions.defaults()
    stated = 0
    for action in build_parser()._actions:
        found = re.search(r"\(default: ([^)]*)\)", action.help or "")
        if found is None or action.dest not in defaults or defaults[action.dest] is None:
            continue
        stated += 1
        value = defaults[action.dest]
        values = list(value) if isinstance(value, tuple) else [value]
        words = re.split(r"[\s,]+", found.group(1))[: len(values)]
        assert all(map(same, words, values)) and len(words) == len(values), action.dest
    assert stated >= 20  # the check reads the help it means to


def test_parsed_options_are_run_options_and_run_json_is_their_dump(tmp_path):
    from train_evaluate.config.options import dump_options, parse_args
    from train_evaluate.config.run_options import RunOptions

    options = parse_args(["--methods", "int2", "--layers", "all", "--calib-images", "8"])
    assert isinstance(options, RunOptions)
    assert options.given() == {"methods": ("int2",), "layers": ("all",), "calib_images": 8}
    config = tmp_path / "options.json"
    config.write_text(json.dumps(dump_options(options)))
    # the dump read back with --config is the same options; the command line overrides it
    assert parse_args(["--config", str(config)]) == options
    assert parse_args(["--config", str(config), "--seed", "3"]).seed == 3
