"""ECM on VAR (spec shared/specs/ecm.md): networks and maths as plain ``nn.Module``s / pure functions.

Networks: :class:`VQVAE` (vqvae.py), :class:`VAR` (var.py; its blocks in layers.py),
:class:`ECMControlNet` (control.py).
Maths: scales.py (schedule, mask, φ table), sampling.py (CFG, temperature, top-k/top-p, early-centric draw).
Loading: checkpoint.py. The LightningModules (``VQVAEModule``, ``VARModule``, ``ECMModule``) live in
``module_*.py`` and are re-exported at the end of this file.
"""
from .checkpoint import (
    fake_state_dict,
    find_fixtures_dir,
    load_state_dict_strict,
    read_manifest,
    read_state_dict_file,
    sha256_of,
)
from .control import (
    CONTROL_PRESETS,
    Adapter,
    ECMControlNet,
    ECMHook,
    ViTEncoder,
    freeze_backbone,
    per_scale_tokens,
)
from .sampling import (
    DEFAULT_TRUNC_PROBS,
    cfg_mix,
    cfg_ratio,
    draw_trunc_scale,
    normalize_trunc_probs,
    sample_top_k_top_p,
    temperature_schedule,
    top_k_top_p_filter_,
    trunc_generator,
)
from .scales import (
    DEFAULT_PATCH_NUMS,
    PHI_TABLE_10,
    TINY_PATCH_NUMS,
    begin_ends,
    block_causal_bias,
    ends_for,
    lvl_index,
    phi_table,
    total_tokens,
    trunc_stats,
)
from .var import VAR, VAR_PRESETS, VARHook, build_var, drop_labels
from .vqvae import (
    VQVAE,
    VQVAE_PRESETS,
    build_vqvae,
    codebook_usage,
    straight_through,
    vq_scale_loss,
)

__all__ = [
    "CONTROL_PRESETS",
    "DEFAULT_PATCH_NUMS",
    "DEFAULT_TRUNC_PROBS",
    "PHI_TABLE_10",
    "TINY_PATCH_NUMS",
    "VAR",
    "VAR_PRESETS",
    "VQVAE",
    "VQVAE_PRESETS",
    "Adapter",
    "ECMControlNet",
    "ECMHook",
    "VARHook",
    "ViTEncoder",
    "begin_ends",
    "block_causal_bias",
    "build_var",
    "build_vqvae",
    "cfg_mix",
    "cfg_ratio",
    "codebook_usage",
    "draw_trunc_scale",
    "drop_labels",
    "ends_for",
    "fake_state_dict",
    "find_fixtures_dir",
    "freeze_backbone",
    "load_state_dict_strict",
    "lvl_index",
    "normalize_trunc_probs",
    "per_scale_tokens",
    "phi_table",
    "read_manifest",
    "read_state_dict_file",
    "sample_top_k_top_p",
    "sha256_of",
    "straight_through",
    "temperature_schedule",
    "top_k_top_p_filter_",
    "total_tokens",
    "trunc_generator",
    "trunc_stats",
    "vq_scale_loss",
]

# LightningModules (import Lightning; re-exported so configs can say ``ctrlgen.lightning_modules.ecm.ECMModule``)
from .module_ecm import ECMModule  # noqa: E402
from .module_var import VARModule  # noqa: E402
from .module_vqvae import VQVAEModule  # noqa: E402

__all__ += ["ECMModule", "VARModule", "VQVAEModule"]
