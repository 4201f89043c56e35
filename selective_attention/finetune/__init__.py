"""Fine-tuning and evaluation recipes on MNLI (Trainer + PEFT), reused by the scripts under `recipes/`."""

from .config import DataConfig, FinetuneConfig, LoraConfigSection, MaskedEvalConfig, TrainingConfig, load_config

__all__ = ["DataConfig", "FinetuneConfig", "LoraConfigSection", "MaskedEvalConfig", "TrainingConfig", "load_config"]
