"""What a run trains on, loaded once: the backbone's cached features (the FC study) or the
model with its cached images or cut states (whole network), the seeded split, and the weights
file (the demo's classifier is trained here, on the train split).
"""

from __future__ import annotations

import logging

from train_evaluate.runtime.errors import UsageError

log = logging.getLogger("train_model")


def load_features(plan):
    """Backbone -> cached features (one pass per image, reused across runs), the split, and
    the weights file (the demo's is trained here, on the train split)."""
    from data import split_indices
    from train_evaluate.inputs.demo import demo_weights
    from train_evaluate.inputs.features import backbone_features, default_workers

    weights = plan.weights
    if plan.demo:
        # The demo classifier trains on the train split, so the split is drawn first; it is the
        # same split that is drawn below from the (identical) list of readable digits.
        split = split_indices(len(plan.source.ids), plan.fractions, plan.sweep.seed)
        weights = demo_weights(plan.cache_dir, plan.source, split["train"], plan.sweep.seed)
    workers = (
        plan.decode_workers if plan.decode_workers is not None else default_workers(plan.device)
    )
    try:
        found = backbone_features(
            plan.model,
            weights,
            plan.source,
            plan.device,
            plan.cache_dir,
            plan.feature_batch_size,
            workers,
            plan.backbone,
            plan.decode,
        )
        split = split_indices(len(found.cached.ids), plan.fractions, plan.sweep.seed)
    except ValueError as error:  # bad weights; a split emptied by skipped images
        raise UsageError(str(error)) from error
    if found.cached.skipped:
        log.warning("the unreadable images are listed in run.json")
    return found, weights, split


def load_images(plan):
    """Whole-network mode: the model, the decoded uint8 images (cached), the split and the
    weights file. Same split, same demo classifier as ``load_features``."""
    import copy

    from data import split_indices
    from lora.cut import cut_model
    from lora.folding import fold_batchnorm_
    from train_evaluate.inputs import images as image_cache
    from train_evaluate.inputs.backbone import (
        BackboneError,
        create_backbone,
        eval_transform,
        weights_id,
    )
    from train_evaluate.inputs.demo import demo_weights
    from train_evaluate.inputs.features import (
        BackboneFeatures,
        check_labels,
        default_workers,
        environment,
        feature_key,
    )

    weights, model = plan.weights, plan.backbone
    if plan.demo:
        split = split_indices(len(plan.source.ids), plan.fractions, plan.sweep.seed)
        weights = demo_weights(plan.cache_dir, plan.source, split["train"], plan.sweep.seed)
        model = create_backbone(plan.model, weights, plan.device)
    workers = (
        plan.decode_workers if plan.decode_workers is not None else default_workers(plan.device)
    )
    try:
        num_classes = model.get_classifier().out_features
        check_labels(plan.source, num_classes, plan.model)
        transform = eval_transform(model)
        cached, key, reused = image_cache.cached_images(
            plan.source,
            image_cache.uint8_transform(transform),
            plan.cache_dir,
            num_classes,
            plan.feature_batch_size,
            workers,
        )
        split = split_indices(len(cached.ids), plan.fractions, plan.sweep.seed)
    except (ValueError, BackboneError) as error:
        raise UsageError(str(error)) from error
    if cached.skipped:
        log.warning("%d unreadable images were skipped; they are listed in run.json",
                    len(cached.skipped))  # fmt: skip
    mean, std = image_cache.normalisation(transform)
    if plan.network.folded:  # the selected convs take in their BatchNorms before compressing
        model = copy.deepcopy(model)
        fold_batchnorm_(model, dict(plan.network.folded))
    wrapped = image_cache.ImageModel(model, mean, std).to(plan.device).eval().requires_grad_(False)
    found = plan.network.cut
    if found is not None:
        # the prefix before the cut is never compressed: its output is cached once, and every
        # step, calibration pass and evaluation runs from there on
        states_key = feature_key(
            images=key,
            model=plan.model,
            weights=weights_id(plan.model, weights),
            environment=environment(plan.device),
            cut=found.module,
        )
        cached, reused = image_cache.cached_states(
            cached, wrapped, found, plan.cache_dir, states_key, num_classes,
            plan.feature_batch_size,
        )  # fmt: skip
        key = states_key
        suffix = cut_model(model, found, plan.network.input_size)
        wrapped = image_cache.StateModel(suffix, mean, std, found.state_shape).to(plan.device)
        wrapped.eval().requires_grad_(False)
    identity = run_identity(plan, key, weights)
    return BackboneFeatures(wrapped, identity, cached, reused), weights, split


def run_identity(plan, key: str, weights) -> str:
    """What a whole-network run's studies and records depend on besides its inputs (``key``:
    the images' or states' cache key): the model, its weights, the selected layers, the
    calibration set's size, its views and the BatchNorms folded (the last two keys only where
    set, so that earlier runs keep theirs)."""
    from train_evaluate.inputs.backbone import weights_id
    from train_evaluate.inputs.features import environment, feature_key

    extra: dict = {}
    if plan.network.folded:
        extra["folded_batchnorm"] = [list(pair) for pair in plan.network.folded]
    if plan.network.calib_augment > 1:
        extra["calib_augment"] = plan.network.calib_augment
    return feature_key(
        images=key,
        model=plan.model,
        weights=weights_id(plan.model, weights),
        environment=environment(plan.device),
        layers=list(plan.network.layers),
        calib_images=plan.network.calib_images,
        **extra,
    )
