"""Packed checkpoints: exact round trips, sizes that match the accounting, damage refused."""

import json
import struct

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from compression import (
    Int1Config,
    IntNConfig,
    NMConfig,
    SparseConfig,
    account_layer,
    pack_codes,
)
from lora import LoraConfig, LoraLinear, make_init_context, make_lora_linear
from tests.conftest import REPO, TINY_MODEL
from train_evaluate.inputs.backbone import pre_logits
from train_evaluate.outputs.checkpoint import CheckpointError, write_packed
from train_evaluate.outputs.deploy import load_into, write_merged
from train_evaluate.outputs.network_checkpoint import read_packed

COMPRESSIONS = [SparseConfig(), SparseConfig(block=(3, 3)), SparseConfig(block=(16, 32)),
                Int1Config(scale="none"), Int1Config(scale="tensor"), Int1Config(scale="row"),
                IntNConfig(4), NMConfig(), NMConfig((2, 300))]  # fmt: skip


def trained_layer(compression, init="svd_init", rank=8, use_dora=False, shape=(100, 48)):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    features = torch.randn(200, shape[1], generator=generator)
    context = make_init_context(linear, compression, features)
    config = LoraConfig(r=rank, lora_alpha=16, init=init, use_dora=use_dora, loftq_iters=3)
    layer = make_lora_linear(linear, config, context, generator)
    with torch.no_grad():  # stand-in for training: move the adapter away from its init
        for param in layer.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return layer, features


def header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c.describe())
@pytest.mark.parametrize("init,use_dora", [("svd_init", False), ("loftq_init", False),
                                           ("paper_init", True)])  # fmt: skip
def test_round_trip_gives_identical_logits(compression, init, use_dora, tmp_path):
    layer, features = trained_layer(compression, init, use_dora=use_dora)
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer, extra={"note": "test"})
    loaded = read_packed(path)
    assert torch.equal(loaded.layer.base_layer.weight, layer.base_layer.weight)
    assert torch.equal(loaded.layer.base_layer.bias, layer.base_layer.bias)
    with torch.no_grad():
        assert torch.equal(loaded.layer(features), layer(features))
    assert loaded.info["note"] == "test" and loaded.info["rank"] == 8


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c.describe())
def test_file_size_is_the_counted_bits_plus_the_container(compression, tmp_path):
    out_features, in_features = 1000, 512
    layer, _ = trained_layer(compression, rank=16, shape=(out_features, in_features))
    path = tmp_path / "layer.safetensors"
    size = write_packed(path, layer)
    counted = account_layer(out_features, in_features, layer.base_compressed.cost, 16,
                            include_bias=True)  # fmt: skip
    payload = size - header_bytes(path)
    padded_parts = len(layer.base_compressed.codes)
    assert 0 <= payload * 8 - counted.compressed_bits < 8 * max(padded_parts, 1)
    assert header_bytes(path) < 2500  # the fixed overhead: 8 bytes + the JSON header


def test_fp16_adapter_halves_the_adapter_and_stays_close(tmp_path):
    layer, features = trained_layer(SparseConfig(), rank=16, shape=(400, 128))
    full, half = tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors"
    saved = write_packed(full, layer) - write_packed(half, layer, adapter_dtype="fp16")
    assert saved - 16 * (400 + 128) * 2 in range(-64, 64)  # the headers differ by a few bytes
    with torch.no_grad():
        torch.testing.assert_close(read_packed(half).layer(features), layer(features),
                                   rtol=1e-2, atol=1e-2)  # fmt: skip


def test_a_truncated_file_is_refused_in_one_line(tmp_path):
    layer, _ = trained_layer(Int1Config())
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="safetensors header") as caught:
        read_packed(path)
    assert "\n" not in str(caught.value)


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    layer, _ = trained_layer(SparseConfig())
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_packed(path)


def test_edited_metadata_is_caught_by_the_checksum(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    layer, _ = trained_layer(SparseConfig())
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    metadata["checkpoint"] = metadata["checkpoint"].replace(
        '"lora_alpha": 16.0', '"lora_alpha": 48.0'
    )
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="sha256"):
        read_packed(path)


def test_other_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable packed checkpoint"):
        read_packed(garbage)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(CheckpointError, match="is not a lora-compression-packed/1"):
        read_packed(plain)


def test_merged_export_is_one_dense_layer(tmp_path):
    layer, features = trained_layer(NMConfig(), use_dora=True)
    path = tmp_path / "merged.safetensors"
    write_merged(path, layer)
    tensors = load_file(str(path))
    assert set(tensors) == {"weight", "bias"} and tensors["weight"].shape == (100, 48)
    with torch.no_grad():
        merged = features @ tensors["weight"].T + tensors["bias"]
        torch.testing.assert_close(merged, layer(features), rtol=1e-5, atol=1e-5)


def test_metadata_is_json_and_names_the_compressor(tmp_path):
    layer, _ = trained_layer(SparseConfig(block=(1, 16), keep="max"))
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        info = json.loads(handle.metadata()["checkpoint"])["layers"]["layer"]
    assert info["method"] == "sparse" and info["compression"] == {"block": [1, 16], "keep": "max"}
    assert info["parts"]["positions_1x16"]["bits"] == 4


# --- metadata edited and given a recomputed digest: refused in one line, never a traceback ---


def rewrite(path, edit_info=None, edit_tensors=None, name="layer"):
    """Edit the JSON metadata and/or tensors of a packed file's layer ``name`` and recompute
    the file's digest, as someone who knows the format could: only the consistency checks can
    catch it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from train_evaluate.outputs.checkpoint import digest

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    info = json.loads(metadata["checkpoint"])
    if edit_info is not None:
        info["layers"][name] = edit_info(info["layers"][name])
    prefix = f"{name}/"
    tensors = {key.removeprefix(prefix): value for key, value in stored.items()}
    if edit_tensors is not None:
        edit_tensors(tensors)
    tensors = {f"{prefix}{key}": value for key, value in tensors.items()}
    text = json.dumps(info)
    metadata.update(checkpoint=text, sha256=digest(tensors, text))
    save_file(tensors, str(path), metadata=metadata)


def set_field(key, value):
    def edit(info):
        info[key] = value
        return info

    return edit


def set_part(name, key, value):
    def edit(info):
        info["parts"][name][key] = value
        return info

    return edit


def drop_part(name):
    def edit(info):
        del info["parts"][name]
        return info

    return edit


def replace_tensor(name, value):
    def edit(tensors):
        tensors[name] = value

    return edit


def past_the_block(tensors):
    """Every 3x3 position set to 15 (fits its 4 bits, but a 3x3 block has 9 entries)."""
    tensors["base.positions_3x3"] = pack_codes(torch.full((33 * 16,), 15), 4)


EDITS = {  # case: (compressor, metadata edit, tensor edit, what the one line must say)
    "unknown method": (None, set_field("method", "int9"), None, "unknown compression method"),
    "other method": (None, set_field("method", "int4"), None, "is not what method int4"),
    "shape not ints": (None, set_field("shape", [100, "48"]), None, "is not two positive"),
    "shape zero": (None, set_field("shape", [100, 0]), None, "is not two positive"),
    "shape one dim": (None, set_field("shape", [4800]), None, "is not two positive"),
    "shape other": (None, set_field("shape", [100, 40]), None, "lora_A has shape (8, 48)"),
    # rank 0 is a layer without adapter: this one's adapter tensors are then strangers
    "rank zero": (None, set_field("rank", 0), None, "tensors no packed layer has: lora_A"),
    "rank negative": (None, set_field("rank", -1), None, "rank -1 is not an integer in 0..48"),
    "rank past min": (None, set_field("rank", 64), None, "rank 64 is not an integer in 0..48"),
    "rank other": (None, set_field("rank", 4), None, "lora_A has shape (8, 48)"),
    "rank text": (None, set_field("rank", "8"), None, "rank '8' is not an integer"),
    "alpha negative": (None, set_field("lora_alpha", -16), None, "lora_alpha -16"),
    "alpha text": (None, set_field("lora_alpha", "16"), None, "lora_alpha '16'"),
    "dora claimed": (None, set_field("use_dora", True), None, "tensor lora_magnitude is missing"),
    "dora text": (None, set_field("use_dora", "no"), None, "use_dora 'no'"),
    "dtype unknown": (None, set_field("adapter_dtype", "fp8"), None, "adapter dtype 'fp8'"),
    "dtype other": (None, set_field("adapter_dtype", "fp16"), None, "needs torch.float16"),
    "config other": (None, set_field("compression", {"block": [8, 8], "keep": "absmax"}), None,
                     "stores parts"),
    "config bad": (None, set_field("compression", {"block": [0, 4], "keep": "absmax"}), None,
                   "is not valid for sparse"),
    "config extra": (None, set_field("compression", {"block": [4, 4], "keep": "absmax", "x": 1}),
                     None, "is not what method sparse stores"),
    "config text": (None, set_field("compression", "4x4"), None, "is not a JSON object"),
    "part dropped": (None, drop_part("positions_4x4"), None, "stores parts"),
    "part shape": (None, set_part("values", "shape", [299]), None, "part values is described"),
    "part bits": (None, set_part("positions_4x4", "bits", 5), None, "part positions_4x4 is"),
    "part dtype": (None, set_part("values", "dtype", "float16"), None, "part values is"),
    "cost": (None, set_field("cost", {"value_bits": 1, "index_bits": 0, "scale_bits": 0,
                                      "macs": 1}), None, "storage cost"),
    "not an object": (None, lambda info: [info], None, "metadata is not a JSON object"),
    "bias shape": (None, None, replace_tensor("bias", torch.zeros(99)), "bias has shape (99,)"),
    "lora_B shape": (None, None, replace_tensor("lora_B", torch.zeros(100, 7)),
                     "lora_B has shape (100, 7)"),
    "stray tensor": (None, None, replace_tensor("extra", torch.zeros(3)), "no packed layer has"),
    "values short": (None, None, replace_tensor("base.values", torch.zeros(10)),
                     "part values has shape (10,)"),
    "codes short": (None, None, replace_tensor("base.positions_4x4", torch.zeros(10).byte()),
                    "part positions_4x4 should be 150 packed bytes"),
    "position past block": (SparseConfig(block=(3, 3)), None, past_the_block,
                            "do not rebuild the compressed weight"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EDITS))
def test_edited_metadata_with_a_recomputed_digest_is_refused_in_one_line(case, tmp_path, capsys):
    from train_evaluate.evaluate import main as evaluate_main

    compression, edit_info, edit_tensors, fragment = EDITS[case]
    layer, _ = trained_layer(compression or SparseConfig())
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer, extra={"model": "test_vit"})
    rewrite(path, edit_info, edit_tensors)
    with pytest.raises(CheckpointError) as caught:
        read_packed(path)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    assert "is not a consistent packed checkpoint" in message

    assert evaluate_main(["--checkpoint", str(path), "--all"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_an_unedited_rewrite_still_loads(tmp_path):
    """The edit helper itself changes nothing when asked to change nothing (the refusals above
    come from the edits, not from the rewriting)."""
    layer, features = trained_layer(SparseConfig(block=(3, 3)), use_dora=True)
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer, adapter_dtype="bf16")
    rewrite(path, lambda info: info)
    with torch.no_grad():
        expected = read_packed(path).layer(features)
        torch.testing.assert_close(expected, layer(features), rtol=2e-2, atol=2e-2)


# --- load_into: a packed checkpoint in a user's own timm model, as docs/outputs.md shows it ---


def readme_example() -> str:
    """The python block of the "Packed checkpoints" section of docs/outputs.md, verbatim."""
    page = (REPO / "docs" / "outputs.md").read_text()
    section = page.split("## Packed checkpoints", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def substituted(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert code.count(old) == 1, f"the docs example no longer holds {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_weights):
    """A packed sparse + r4 adapter over the classifier of the tiny timm model (64 -> 1000)."""
    overlay = {"file": str(tiny_weights)}
    model = timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=overlay)
    generator = torch.Generator().manual_seed(0)
    head = model.get_classifier()
    context = make_init_context(head, SparseConfig(), torch.randn(64, 64, generator=generator))
    config = LoraConfig(r=4, lora_alpha=16, init="svd_init")
    layer = make_lora_linear(head, config, context, generator)
    with torch.no_grad():  # as if trained: the adapter is no longer the residual's SVD
        layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=generator))
    path = tmp_path / "quant=sparse_r=4.safetensors"
    write_packed(path, layer, extra={"model": TINY_MODEL})
    return path, layer


def test_the_readme_example_puts_the_checkpoint_into_the_model(tiny_checkpoint, tiny_weights):
    path, layer = tiny_checkpoint
    code = substituted(
        readme_example(),
        {
            '"results/digits_vit/digits/svd_init/checkpoints/quant=sparse_r=8.safetensors"': repr(
                str(path)
            ),
            '"resnet18.tv_in1k", pretrained=True': f'"{TINY_MODEL}", pretrained=True, '
            f"pretrained_cfg_overlay={{'file': {str(tiny_weights)!r}}}",
        },
    )
    images = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    scope = {"images": images}
    exec(compile(code, "docs/outputs.md", "exec"), scope)

    overlay = {"file": str(tiny_weights)}
    backbone = timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        expected = layer(pre_logits(backbone.eval(), images))
    assert isinstance(scope["model"].head, LoraLinear)
    assert torch.equal(scope["logits"], expected)


def test_load_into_merged_and_refusals(tiny_checkpoint, tiny_weights):
    path, layer = tiny_checkpoint
    overlay = {"file": str(tiny_weights)}
    model = timm.create_model(TINY_MODEL, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    features = torch.randn(5, 64)
    merged = load_into(model, path, merge=True).get_classifier()
    assert type(merged) is nn.Linear and model.head is merged
    with torch.no_grad():
        torch.testing.assert_close(merged(features), layer(features), rtol=1e-5, atol=1e-5)

    # another class count: the checkpoint's layer would not fit this classifier
    other = timm.create_model(TINY_MODEL, pretrained=False, num_classes=10)
    with pytest.raises(CheckpointError, match="holds a 1000 x 64 classifier; this model's head"):
        load_into(other, path)
    assert type(other.head) is nn.Linear  # left as it was
    # the same shape on another architecture: the adapter was trained on other features
    rewrite(path, set_field("model", "resnet18.tv_in1k"))
    with pytest.raises(CheckpointError, match=r"trained for resnet18\.tv_in1k; this model is"):
        load_into(timm.create_model(TINY_MODEL, pretrained=False), path)
