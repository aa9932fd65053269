"""Packed checkpoints: exact round trips, sizes that match the accounting, damage refused."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compression import Int1Config, IntNConfig, NMConfig, SparseConfig, account_layer
from lora import LoraConfig, make_init_context, make_lora_linear
from train_evaluate.checkpoint import CheckpointError, read_packed, write_merged, write_packed

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
        info = json.loads(handle.metadata()["checkpoint"])
    assert info["method"] == "sparse" and info["compression"] == {"block": [1, 16], "keep": "max"}
    assert info["parts"]["positions_1x16"]["bits"] == 4
