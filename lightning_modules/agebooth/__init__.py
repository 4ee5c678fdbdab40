"""AgeBooth (arXiv 2510.05715): age LoRAs fused with one α. ``fusion`` (linear, SVDMix, peft merges on LoRA factors),
``adapters`` (load age LoRAs, materialise one fused adapter per α, save it in diffusers' format), ``prompts``
(prompt-embedding fusion)."""
