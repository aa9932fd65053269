"""The FC study's ``Target`` (``training.target``): one compressor applied to the classifier,
on the cached pre-logits features (the whole network's is ``training.network.NetworkMethod``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression import StorageCost, compress
from lora import InitContext, LoraConfig, LoraLinear, make_lora_linear
from lora.inits import DEFAULT_FIT, FitConfig
from lora.plan import LayerPlan, LayerSpec


@dataclass(eq=False)
class Method:
    """One compressor applied to the classifier; shared by all of its ranks and trials."""

    name: str
    config: Any
    head: nn.Linear
    context: InitContext
    cost: StorageCost
    # per rank, the reconstruction's stages (``--reconstruct``; the classifier alone has none)
    records: dict[int, list] = field(default_factory=dict, repr=False)
    # the classifier's module name in the model (what its plans and files name); a study on
    # features alone, with no model, calls it head
    module: str = "head"

    @classmethod
    def create(
        cls,
        name: str,
        config: Any,
        head: nn.Linear,
        features: torch.Tensor,
        module: str = "head",
        fit: FitConfig = DEFAULT_FIT,
    ) -> Method:
        weight = head.weight.detach()
        context = InitContext(weight, None, config, features, fit=fit)
        # a calibrated compressor sees the train features' moment (never val or test)
        context.compressed = compress(weight, config, context.compress_moment)
        return cls(name, config, head, context, context.compressed.cost, module=module)

    def layer_plan(self, rank: int, adapter_dtype: str) -> LayerPlan:
        """The plan of this method's model at ``rank``: the classifier alone."""
        layers = ((self.module, LayerSpec(self.name, rank)),)
        return LayerPlan(self.name, layers, adapter_dtype)

    def descriptions(self) -> dict[str, str]:
        return {self.name: self.config.describe()}

    def compressed_model(self, sweep: Any = None) -> nn.Linear:
        """The compressed layer alone (W_c and the original bias): the "quantized" row (its
        context holds W_c already: nothing for ``sweep`` to share)."""
        head = self.head
        linear = nn.Linear(
            head.in_features,
            head.out_features,
            bias=head.bias is not None,
            device=head.weight.device,
        )
        with torch.no_grad():
            linear.weight.copy_(self.context.base_weight)
            if head.bias is not None:
                linear.bias.copy_(head.bias)
        return linear.requires_grad_(False)

    def adapted(self, rank: int, alpha: float, sweep: Any, seed: int) -> LoraLinear:
        """The compressed classifier with a fresh adapter of ``rank``, ``alpha`` and ``seed``."""
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init=sweep.init,
            use_dora=sweep.use_dora and rank > 0,  # rank 0: no adapter, no magnitude
            loftq_iters=sweep.loftq_iters,
        )
        generator = torch.Generator(device=self.head.weight.device).manual_seed(seed)
        return make_lora_linear(self.head, config, self.context, generator)

    def adapters_of(self, model: LoraLinear) -> dict[str, nn.Module]:
        return {self.module: model}

    def load(self, path: Path, device: torch.device | str) -> LoraLinear:
        """The adapted classifier a packed checkpoint of this method holds."""
        from train_evaluate.outputs.network_checkpoint import read_packed

        return read_packed(path, device).layer
