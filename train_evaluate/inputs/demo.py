"""The offline demo's classifier: a small timm ViT, "pretrained" here on the digits train split.

With no ImageNet folder the driver runs the whole study on scikit-learn's digits. There is no
downloadable classifier for them, so the pipeline trains one (about ten seconds on two CPU
cores), on the train split only, and caches its weights. From then on the demo takes the same
path as ImageNet: the weights file is loaded through timm's pretrained-weight code, features are
cached, and the classifier's FC (10 x 64) is compressed and adapted. The weights file carries a
digest of its tensors and key; a file that fails it is trained again, never trusted.

The model is registered with timm as ``digits_vit`` (a 2-block ViT on 2x2 patches of the 8x8
image), with its own pretrained config: 1 grey channel, mean 0.3 / std 0.4, no resize.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from train_evaluate.inputs.backbone import eval_transform
from train_evaluate.inputs.features import feature_key
from train_evaluate.runtime import interrupt
from train_evaluate.runtime.files import (
    digest_matches,
    read_safetensors,
    with_digest,
    write_safetensors,
)

log = logging.getLogger(__name__)

DEMO_MODEL = "digits_vit"
WEIGHTS_FORMAT = "lora-compression-demo-weights/1"

default_cfgs = generate_default_cfgs(
    {
        "digits_vit.demo": {
            "num_classes": 10,
            "input_size": (1, 8, 8),
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "mean": (0.3,),
            "std": (0.4,),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


@register_model
def digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 8x8 grey images: 2x2 patches, width 64, 2 blocks, mean-pooled tokens."""
    args = dict(
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        global_pool="avg",
        class_token=False,
    )
    return build_model_with_cfg(VisionTransformer, "digits_vit", pretrained, **{**args, **kwargs})


@dataclass(frozen=True)
class DemoRecipe:
    """How the demo's classifier is trained: AdamW with a one-cycle schedule."""

    epochs: int = 40
    lr: float = 5e-3
    weight_decay: float = 0.05
    batch_size: int = 64


def train_digits_vit(
    images: torch.Tensor, labels: torch.Tensor, seed: int, recipe: DemoRecipe
) -> dict[str, torch.Tensor]:
    """Train ``digits_vit`` from scratch on preprocessed images; returns its state dict."""
    with torch.random.fork_rng():  # timm initialises weights from the global generator
        torch.manual_seed(seed)
        model = timm.create_model(DEMO_MODEL, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(images) // recipe.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps
    )
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(recipe.batch_size):
            interrupt.check()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.state_dict()


def check_demo_weights(path: Path, key: str) -> None:
    """Raise ValueError unless ``path`` holds the demo weights for ``key``, digest intact."""
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != WEIGHTS_FORMAT or metadata.get("key") != key:
        raise ValueError("it was written for other inputs")
    if not digest_matches(tensors, metadata):
        raise ValueError("its SHA-256 digest does not match its contents")


def save_demo_weights(path: Path, key: str, state: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    metadata = with_digest(tensors, {"format": WEIGHTS_FORMAT, "key": key})
    write_safetensors(path, tensors, metadata)


def _scratch_folder() -> Path:
    """A private folder removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="lora-compression-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def demo_weights(
    cache_dir: Path,
    source,
    train_indices: torch.Tensor,
    seed: int,
    recipe: DemoRecipe | None = None,
) -> Path:
    """The demo classifier's weights file, trained on ``train_indices`` once and then reused.

    A cache that cannot be written costs a warning: the weights go to a temporary file that
    lives as long as this run.
    """
    recipe = recipe or DemoRecipe()
    train_ids = [source.ids[i] for i in train_indices.tolist()]
    key = feature_key(
        model=DEMO_MODEL, data=source.fingerprint, train=train_ids, seed=seed, recipe=asdict(recipe)
    )
    path = Path(cache_dir) / f"{DEMO_MODEL}-{key[:20]}.safetensors"
    if path.exists():
        try:
            check_demo_weights(path, key)
            log.info("demo classifier: reusing %s", path)
            return path
        except Exception as error:  # any read error means: retrain rather than trust it
            log.warning("demo classifier %s is damaged (%s); training it again", path, error)
    log.info(
        "demo classifier: training %s on the %d train digits (once, cached in %s)",
        DEMO_MODEL,
        len(train_ids),
        path.parent,
    )
    transform = eval_transform(timm.create_model(DEMO_MODEL, pretrained=False))
    images = torch.stack([transform(source.load(i)) for i in train_indices.tolist()])
    labels = torch.tensor([source.labels[i] for i in train_indices.tolist()])
    state = train_digits_vit(images, labels, seed, recipe)
    try:
        save_demo_weights(path, key, state)
    except OSError as error:
        log.warning(
            "demo classifier: cannot write %s (%s); using a temporary copy for this run only",
            path,
            error,
        )
        path = _scratch_folder() / path.name
        save_demo_weights(path, key, state)
    return path
