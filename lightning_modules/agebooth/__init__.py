"""AgeBooth (arXiv 2510.05715): age LoRAs fused with one α. ``module`` (AgeLoRAModule: one band's LoRA, or the demo's
tiny base), ``world`` (the synthetic ``faces`` world and its age/identity estimators), ``fusion`` (linear, SVDMix,
peft merges on LoRA factors), ``adapters`` (load age LoRAs, materialise one fused adapter per α, save it in diffusers'
format), ``prompts`` (prompt-embedding fusion), ``text`` (prompt encoders), ``sampling`` (DDIM and the α sweep)."""

__all__ = ["AgeLoRAModule"]


def __getattr__(name: str):
    """``AgeLoRAModule`` is imported on first use (the world and the fusion code need no Lightning/diffusers)."""
    if name == "AgeLoRAModule":
        from ctrlgen.lightning_modules.agebooth.module import AgeLoRAModule

        return AgeLoRAModule
    raise AttributeError(name)
