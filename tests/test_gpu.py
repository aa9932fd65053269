"""The product on CUDA: every method, init, DoRA, kd, batched = single, packed checkpoints and
``--decode gpu``. Marked `gpu` (skipped without CUDA); run with
``python -m pytest -q -m gpu --device cuda tests/``. One test runs without CUDA: ``--decode gpu``
is refused there."""

import pytest
import torch
from torch import nn

from compression import list_methods, make_config
from data import scan_imagenet_folder
from lora import LORA_INITS, LoraConfig, make_init_context, make_lora_linear
from tests.conftest import run_driver
from train_evaluate.inputs.backbone import create_backbone, eval_transform
from train_evaluate.inputs.features import extract_features
from train_evaluate.outputs.checkpoint import write_packed
from train_evaluate.outputs.network_checkpoint import read_packed
from train_evaluate.training.batched import Run, train_adapters
from train_evaluate.training.training import FeatureSplit, TrainConfig, evaluate, train_adapter

gpu = pytest.mark.gpu


@pytest.fixture
def cuda(device) -> torch.device:
    """gpu tests run on CUDA; ``--device cuda`` says so explicitly, and is the only choice."""
    if device.type != "cuda":
        pytest.skip("run gpu tests with --device cuda")
    return device


def problem(device, n=400, features=32, classes=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(features, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, features, generator=generator))
    x = torch.randn(n, features, generator=generator)
    teacher = head(x).detach()
    half = n // 2
    split = lambda s: FeatureSplit(x[s], teacher[s].argmax(1), teacher_logits=teacher[s])  # noqa: E731
    head = head.to(device)
    return head, split(slice(0, half)).to(device), split(slice(half, n)).to(device)


def layer_on(head, method="sparse", init="svd_init", rank=4, alpha=8, dora=False, seed=0):
    context = make_init_context(head, make_config(method), features=None)
    config = LoraConfig(r=rank, lora_alpha=alpha, init=init, use_dora=dora)
    generator = torch.Generator(device=head.weight.device).manual_seed(seed)
    return make_lora_linear(head, config, context, generator)


def test_decode_gpu_is_refused_in_one_line_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    results = tmp_path / "results"
    code, _, err = run_driver(capsys, "--decode", "gpu", "--results-dir", results)
    assert code == 2
    assert err.strip().count("\n") == 0 and "CUDA" in err
    assert not results.exists()  # refused before any work


@gpu
@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("init", list(LORA_INITS))
def test_every_method_and_init_trains_on_cuda(cuda, method, init):
    head, train, val = problem(cuda)
    features = train.features if init.startswith("act") else None
    context = make_init_context(head, make_config(method), features=features)
    layer = make_lora_linear(head, LoraConfig(r=4, lora_alpha=8, init=init), context)
    assert layer.lora_A.device.type == cuda.type
    result = train_adapter(layer, train, val, TrainConfig(epochs=2, lr=1e-2, batch_size=64))
    assert result.diverged_at is None and result.best_val_acc >= result.history["val_acc"][0]


@gpu
def test_dora_and_kd_train_on_cuda(cuda):
    head, train, val = problem(cuda, seed=1)
    dora = layer_on(head, dora=True)
    result = train_adapter(dora, train, val, TrainConfig(epochs=2, lr=1e-2, batch_size=64))
    assert result.best_val_acc >= result.history["val_acc"][0]
    unlabelled = FeatureSplit(train.features, None, teacher_logits=train.teacher_logits)
    layer = layer_on(head, init="paper_init")
    config = TrainConfig(epochs=3, lr=1e-2, batch_size=64, objective="kd")
    before = evaluate(layer, val)["agree"]
    train_adapter(layer, unlabelled, val, config)
    assert evaluate(layer, val)["agree"] > before


@gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_batched_runs_equal_single_runs_on_cuda(cuda, graphs, monkeypatch):
    from train_evaluate.training import batched

    monkeypatch.setattr(batched, "CUDA_GRAPHS", graphs)
    head, train, val = problem(cuda, seed=2)
    trials = [("Adam", 1e-2, 32, 8), ("SGD", 0.3, 32, 16), ("Adam", 3e-3, 48, 24)]
    configs = [TrainConfig(epochs=3, optimizer=o, lr=lr, batch_size=b, seed=s)
               for s, (o, lr, b, _) in enumerate(trials)]  # fmt: skip
    alone = [train_adapter(layer_on(head, init="paper_init", alpha=a, seed=s), train, val, c)
             for s, ((*_, a), c) in enumerate(zip(trials, configs, strict=True))]  # fmt: skip
    layers = [layer_on(head, init="paper_init", alpha=t[3], seed=s) for s, t in enumerate(trials)]
    outcomes = train_adapters([Run(la, c) for la, c in zip(layers, configs, strict=True)],
                              train.with_base(layers[0]), val.with_base(layers[0]))  # fmt: skip
    for single, outcome in zip(alone, outcomes, strict=True):
        result = outcome.result
        assert result.best_epoch == single.best_epoch
        for key, values in single.history.items():
            torch.testing.assert_close(
                torch.tensor(result.history[key]), torch.tensor(values), rtol=1e-4, atol=1e-4
            )
        for key, value in single.best_state.items():
            torch.testing.assert_close(result.best_state[key], value, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("method", ["sparse", "int1"])
def test_packed_checkpoint_round_trip_on_cuda(cuda, method, tmp_path):
    head, train, val = problem(cuda, seed=3)
    layer = layer_on(head, method=method)
    train_adapter(layer, train, val, TrainConfig(epochs=1, lr=1e-2))
    path = tmp_path / "layer.safetensors"
    write_packed(path, layer)
    loaded = read_packed(path, device=cuda).layer
    assert loaded.lora_A.device.type == cuda.type
    with torch.inference_mode():
        torch.testing.assert_close(loaded(val.features), layer(val.features))


@gpu
def test_gpu_decode_gives_features_close_to_the_cpu_decode(cuda, tiny_weights, image_folder):
    from tests.conftest import TINY_MODEL

    model = create_backbone(TINY_MODEL, tiny_weights, cuda)
    source = scan_imagenet_folder(image_folder)
    transform = eval_transform(model)
    on_cpu = extract_features(model, source, transform, cuda, decode="cpu")
    on_gpu = extract_features(model, source, transform, cuda, decode="gpu")
    assert on_gpu.ids == on_cpu.ids and torch.equal(on_gpu.labels, on_cpu.labels)
    cosine = torch.nn.functional.cosine_similarity(on_gpu.features, on_cpu.features, dim=1)
    assert cosine.min() > 0.98, cosine.min()


@gpu
def test_whole_network_trains_under_autocast_and_its_checkpoint_reloads_on_cuda(cuda, tmp_path):
    import timm

    from train_evaluate.inputs import images as image_cache
    from train_evaluate.inputs import selection as layer_selection
    from train_evaluate.search.sweep import SweepConfig
    from train_evaluate.training import network

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("test_resnet").eval()
    mean, std = image_cache.normalisation(eval_transform(model))
    wrapped = image_cache.ImageModel(model, mean, std).to(cuda).eval().requires_grad_(False)
    names = layer_selection.select_layers(model, ["all"])
    images = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, device=cuda)
    layers = layer_selection.describe_layers(model, names, wrapped.preprocess(images[:1]))
    method = network.NetworkMethod.create("int4", make_config("int4"), wrapped, layers, images[:8])
    adapted = method.adapted(4, 16, SweepConfig(init="act_svd_init"), seed=0)
    labels = torch.randint(0, 1000, (32,), device=cuda)
    split = FeatureSplit(images, labels)
    result = train_adapter(adapted, split, split, TrainConfig(epochs=2, batch_size=8, lr=1e-3))
    assert result.diverged_at is None
    path = tmp_path / "network.safetensors"
    write_packed(path, adapted.adapters(), "fp32", {"model": "test_resnet"})
    rebuilt = network.load_adapted(wrapped, path, cuda)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), adapted(images))


@gpu
def test_block_reconstruction_with_learned_rounding_runs_on_cuda(cuda, tmp_path):
    from compression.adaround import learns_rounding
    from tests.test_reconstruction import RESNET, images, resnet_setup
    from train_evaluate.search.sweep import SweepConfig
    from train_evaluate.training import network

    calibration = images(16, 0).to(cuda)
    method, units = resnet_setup(calibration, compression="int4", quantizer="adaround")
    adapted = method.adapted(4, 16, SweepConfig(init="act_svd_init"), seed=0)
    records = method.records[4]
    assert [r.unit for r in records] == [u for u, _ in units]
    assert all(r.error_end <= r.error_start for r in records), records
    assert sum(r.codes_changed for r in records) > 0, records
    for adapter in adapted.adapters().values():
        stored = adapter.base_compressed
        assert stored.weight.is_cuda and learns_rounding(stored.config)
        codes = stored.parts["codes"].long() - 7
        assert codes.min() >= -7 and codes.max() <= 7
    path = tmp_path / "network.safetensors"
    write_packed(path, adapted.adapters(), "fp32", {"model": RESNET})
    rebuilt = network.load_adapted(method.model, path, cuda)
    pictures = images(6, 9).to(cuda)
    with torch.no_grad():
        assert torch.equal(rebuilt(pictures), adapted(pictures))
