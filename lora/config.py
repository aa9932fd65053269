"""``LoraConfig``: everything that defines one adapter."""

from __future__ import annotations

from dataclasses import dataclass

from lora.inits import get_init


@dataclass(frozen=True)
class LoraConfig:
    """r: rank; lora_alpha: scaling = lora_alpha / r; init: a name from ``LORA_INITS``;
    use_dora: train DoRA's magnitude vector too; loftq_iters: alternations of ``loftq_init``."""

    r: int
    lora_alpha: float = 8.0
    init: str = "paper_init"
    use_dora: bool = False
    loftq_iters: int = 5

    def __post_init__(self) -> None:
        get_init(self.init)  # fails early, listing the valid names
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive; got {self.lora_alpha}")
        if self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be at least 1; got {self.loftq_iters}")
