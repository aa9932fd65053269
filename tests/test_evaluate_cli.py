"""evaluate.py on real parts: a tiny timm model, generated images, a run folder laid out as the
driver lays it out (checkpoint, split files), and the checkpoint metadata the driver writes."""

from __future__ import annotations

import hashlib
import os

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compression import Int1Config
from data import load_digits_source, scan_imagenet_folder
from lora import LoraConfig, make_init_context, make_lora_linear
from lora.attach import classifier_name
from tests.conftest import SYNSETS, TINY_MODEL, write_image
from train_evaluate.config.cli import configure_logging
from train_evaluate.evaluate import main as evaluate_main
from train_evaluate.inputs.backbone import weights_id
from train_evaluate.inputs.demo import DEMO_MODEL
from train_evaluate.inputs.features import backbone_features
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.training.training import FeatureSplit, evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate-cache")


def make_run(root, model, weights_file, source, cache, **info):
    """A run folder as the driver leaves it: ``<root>/checkpoints/quant=int1_r=2.safetensors``
    (an int1 + r2 adapter over the model's classifier) and ``<root>/split/{train,val,test}.txt``
    (every third image is a test image). ``info`` overrides the checkpoint's metadata."""
    # evaluate.main binds logging to the sys.stdout of its call, an earlier test's capture
    configure_logging()
    found = backbone_features(model, weights_file, source, CPU, cache)
    head = found.model.get_classifier()
    generator = torch.Generator().manual_seed(0)
    layer = make_lora_linear(
        head,
        LoraConfig(r=2, lora_alpha=8, init="svd_init"),
        make_init_context(head, Int1Config()),
        generator,
    )
    with torch.no_grad():  # as if trained
        layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=generator))
    ids = found.cached.ids
    texts = {
        name: "".join(f"{i}\n" for n, i in enumerate(ids) if n % 3 == k)
        for k, name in enumerate(("test", "train", "val"))
    }
    for name, text in texts.items():
        (root / "split").mkdir(parents=True, exist_ok=True)
        (root / "split" / f"{name}.txt").write_text(text)
    rows = torch.arange(0, len(ids), 3)
    test = FeatureSplit(found.cached.features[rows], found.cached.labels[rows]).with_base(layer)
    recorded = {
        "model": model,
        "weights": str(weights_file.resolve()),
        "demo": False,
        "data_dir": str(source.root.resolve()) if hasattr(source, "root") else None,
        "test_ids_sha256": hashlib.sha256(texts["test"].encode()).hexdigest(),
        "init": "svd_init",
        "metrics": {"this_model_test_acc": evaluate(layer, test)["acc"]},
    }
    path = root / "checkpoints" / "quant=int1_r=2.safetensors"
    path.parent.mkdir(parents=True)
    write_packed(path, layer, extra={**recorded, **info}, name=classifier_name(found.model))
    return path


def run_evaluate(capsys, *args) -> tuple[int, str, str]:
    code = evaluate_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory, image_folder, tiny_weights, cache):
    """One run for the tests that must leave it as they found it."""
    source = scan_imagenet_folder(image_folder)
    return make_run(tmp_path_factory.mktemp("run"), TINY_MODEL, tiny_weights, source, cache)


# --- 1. --merge never overwrites an input ---


def merge_targets(run, image_folder, tiny_weights, tmp_path):
    """case: (the path --merge names, more arguments)."""
    ids = tmp_path / "ids.txt"
    ids.write_text((run / "split" / "test.txt").read_text())
    checkpoint = run / "checkpoints" / "quant=int1_r=2.safetensors"
    linked = tmp_path / "linked.safetensors"
    linked.symlink_to(checkpoint)
    hard = tmp_path / "hard.safetensors"
    os.link(checkpoint, hard)
    # a copy of the checkpoint in a run folder with no split files yet: a path that resolves to
    # one is refused too (it is where evaluate.py looks for that run's test ids)
    bare = tmp_path / "bare-run" / "checkpoints" / checkpoint.name
    bare.parent.mkdir(parents=True)
    bare.write_bytes(checkpoint.read_bytes())
    absent = bare.parent / ".." / "split" / "test.txt"
    return {
        "checkpoint": (checkpoint, []),
        "checkpoint, another spelling": (run / "split" / ".." / checkpoint.relative_to(run), []),
        "symlink to checkpoint": (linked, []),
        "hard link to checkpoint": (hard, []),
        "ids file": (ids, ["--ids", ids]),
        "weights": (tiny_weights, []),
        "test split": (run / "split" / "test.txt", []),
        "train split": (run / "split" / "train.txt", []),
        "inside the data": (image_folder / SYNSETS[0] / "merged.safetensors", []),
        "absent split file": (absent, ["--all", "--checkpoint", bare]),  # the last one counts
    }


MERGE_CASES = ["checkpoint", "checkpoint, another spelling", "symlink to checkpoint",
               "hard link to checkpoint", "ids file", "weights", "test split", "train split",
               "inside the data", "absent split file"]  # fmt: skip


def snapshot(*folders):
    return {
        path: path.read_bytes()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_refuses_an_input_as_its_output(
    case, imagenet_run, image_folder, tiny_weights, tmp_path, cache, capsys
):
    run = imagenet_run.parent.parent
    target, extra = merge_targets(run, image_folder, tiny_weights, tmp_path)[case]
    # a fresh cache: a refusal must come before the backbone runs and writes to it
    fresh_cache = tmp_path / "fresh-cache"
    before = snapshot(run, tmp_path, image_folder, tiny_weights.parent)
    args = ["--checkpoint", imagenet_run, "--merge", target, "--cache-dir", fresh_cache, *extra]
    code, _, err = run_evaluate(capsys, *args)
    fragment = "is inside the data folder" if case == "inside the data" else "destroy an input"
    assert code == 2 and fragment in one_error_line(err)
    assert snapshot(run, tmp_path, image_folder, tiny_weights.parent) == before
    assert not fresh_cache.exists() and not (tmp_path / "bare-run" / "split").exists()


# --- 5. the merged FC says what it is for ---


def test_merged_file_names_its_model_weights_and_layer(
    imagenet_run, tiny_weights, cache, tmp_path, capsys
):
    merged = tmp_path / "merged.safetensors"
    code, out, _ = run_evaluate(
        capsys, "--checkpoint", imagenet_run, "--merge", merged, "--cache-dir", cache
    )
    assert code == 0 and "reproduced exactly" in out
    with safe_open(str(merged), framework="pt") as handle:
        metadata = handle.metadata()
        weight = handle.get_tensor("weight")
    assert metadata["model"] == TINY_MODEL
    assert metadata["weights"] == weights_id(TINY_MODEL, tiny_weights)
    assert metadata["classifier"] == "head"  # test_vit's pretrained_cfg['classifier']
    assert metadata["method"] == "int1" and metadata["rank"] == "2"
    assert metadata["init"] == "svd_init" and metadata["shape"] == "1000x64"
    layer = read_packed(imagenet_run).layer
    assert torch.equal(weight, layer.merged_weight().detach())


# --- 3. ids are file names, which may hold spaces ---


def test_file_names_with_spaces_are_evaluated(tmp_path, tiny_weights, cache, capsys):
    folder = tmp_path / "spaced"
    for k, synset in enumerate(SYNSETS[:2]):
        (folder / synset).mkdir(parents=True)
        for i, name in enumerate(["a photo.JPEG", "two  spaces.JPEG", " lead.JPEG", "plain.JPEG"]):
            write_image(folder / synset / name, seed=10 * k + i)
    source = scan_imagenet_folder(folder)
    checkpoint = make_run(tmp_path / "run", TINY_MODEL, tiny_weights, source, cache)
    test_ids = (tmp_path / "run" / "split" / "test.txt").read_text().splitlines()
    assert any(" " in i for i in test_ids)

    code, out, err = run_evaluate(capsys, "--checkpoint", checkpoint, "--cache-dir", cache)
    assert code == 0, err
    assert f"on {len(test_ids)} images" in out and "reproduced exactly" in out

    # --ids: one per line, CRLF line ends and empty lines tolerated, spaces kept
    ids = tmp_path / "ids.txt"
    ids.write_bytes(("\r\n".join([test_ids[0], "", test_ids[1]]) + "\r\n\n").encode())
    code, out, err = run_evaluate(
        capsys, "--checkpoint", checkpoint, "--ids", ids, "--cache-dir", cache
    )
    assert code == 0, err
    assert "on 2 images" in out


# --- 4 and 7. the demo's data is built in; weights and data named by id, not by path ---


@pytest.fixture(scope="module")
def demo_weights_file(tmp_path_factory):
    """Fixed random digits_vit weights in a cache folder, named as the demo names its own."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = timm.create_model(DEMO_MODEL, pretrained=False).state_dict()
    folder = tmp_path_factory.mktemp("demo-cache")
    path = folder / f"{DEMO_MODEL}-0123456789abcdef0123.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_demo_checkpoint_refuses_data_dir_and_finds_its_weights_in_the_cache(
    tmp_path, demo_weights_file, image_folder, capsys
):
    cache = demo_weights_file.parent
    source = load_digits_source()
    checkpoint = make_run(
        tmp_path / "run",
        DEMO_MODEL,
        demo_weights_file,
        source,
        cache,
        demo=True,
        data_dir=None,
        weights=weights_id(DEMO_MODEL, demo_weights_file),  # an id, no path
    )
    args = ["--checkpoint", checkpoint, "--cache-dir", cache]
    code, _, err = run_evaluate(capsys, *args, "--data-dir", image_folder)
    assert code == 2 and "--data-dir does not apply to a demo checkpoint" in one_error_line(err)

    code, out, err = run_evaluate(capsys, *args)
    assert code == 0, err
    assert "reproduced exactly" in out

    # other weights in the cache under the demo's name pattern are not taken for these
    empty = tmp_path / "other-cache"
    empty.mkdir()
    demo_weights_file_copy = empty / demo_weights_file.name
    with torch.random.fork_rng():
        torch.manual_seed(1)
        state = timm.create_model(DEMO_MODEL, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(demo_weights_file_copy))
    code, _, err = run_evaluate(capsys, "--checkpoint", checkpoint, "--cache-dir", empty)
    assert code == 2 and "pass --weights FILE" in one_error_line(err)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """test_vit weights other than ``tiny_weights`` (another seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = timm.create_model(TINY_MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("other-weights") / "test_vit.pth"
    torch.save(model.state_dict(), path)
    return path


def test_weights_and_data_named_by_id_need_the_flags(
    tmp_path, image_folder, tiny_weights, other_weights, cache, capsys
):
    source = scan_imagenet_folder(image_folder)
    checkpoint = make_run(
        tmp_path / "run",
        TINY_MODEL,
        tiny_weights,
        source,
        cache,
        weights=weights_id(TINY_MODEL, tiny_weights),
        data_dir=image_folder.name,
    )
    base = ["--checkpoint", checkpoint, "--cache-dir", cache]
    code, _, err = run_evaluate(capsys, *base)
    assert code == 2 and "pass --data-dir FOLDER" in one_error_line(err)
    code, _, err = run_evaluate(capsys, *base, "--data-dir", image_folder)
    assert code == 2 and "pass --weights FILE" in one_error_line(err)
    code, _, err = run_evaluate(
        capsys, *base, "--data-dir", image_folder, "--weights", other_weights
    )
    assert code == 2 and "not the backbone weights this checkpoint" in one_error_line(err)
    code, out, err = run_evaluate(
        capsys, *base, "--data-dir", image_folder, "--weights", tiny_weights
    )
    assert code == 0 and "reproduced exactly" in out, err


def test_an_old_checkpoint_whose_absolute_paths_moved_asks_for_the_flags(
    tmp_path, image_folder, tiny_weights, cache, capsys
):
    source = scan_imagenet_folder(image_folder)
    gone = tmp_path / "gone"
    checkpoint = make_run(
        tmp_path / "run",
        TINY_MODEL,
        tiny_weights,
        source,
        cache,
        weights=str(gone / "test_vit.pth"),
        data_dir=str(gone / "imagenet"),
    )
    base = ["--checkpoint", checkpoint, "--cache-dir", cache]
    code, _, err = run_evaluate(capsys, *base)
    assert code == 2 and "pass --data-dir FOLDER" in one_error_line(err)
    code, _, err = run_evaluate(capsys, *base, "--data-dir", image_folder)
    assert code == 2 and "pass --weights FILE" in one_error_line(err)
    code, out, err = run_evaluate(
        capsys, *base, "--data-dir", image_folder, "--weights", tiny_weights
    )
    assert code == 0 and "reproduced exactly" in out, err
