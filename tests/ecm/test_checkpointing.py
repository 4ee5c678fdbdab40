"""Activation checkpointing of the VAR blocks and the ECM adapters (``grad_checkpointing``): the same loss and
gradients (drop-path masks replayed) and far fewer bytes kept for the backward (the module knob: test_module_knobs)."""
import pytest
import torch
import torch.nn.functional as F

from ctrlgen.lightning_modules.ecm.control import CONTROL_PRESETS, ECMControlNet, freeze_backbone
from ctrlgen.lightning_modules.ecm.var import build_var


def _var(drop_path=0.0):
    torch.manual_seed(0)
    var = build_var("tiny", depth=4, embed_dim=64, num_heads=2, drop_path_rate=drop_path, cond_drop_rate=0.0)
    var.init_weights(init_head=1.0, aln_gamma=0.5)  # blocks matter for the logits
    return var


def _inputs(var, B=3):
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, var.num_classes, (B,), generator=g)
    x = torch.randn(B, var.L - var.first_l, var.Cvae, generator=g)
    target = torch.randint(0, var.V, (B, var.L), generator=g)
    return label, x, target


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _loss_and_grads(model, fn, ckpt: bool, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop-path draws
    loss = fn(ckpt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_var_checkpointing_same_gradients_with_drop_path():
    var = _var(drop_path=0.3).train()
    label, x, target = _inputs(var)

    def fn(ckpt):
        var.grad_checkpointing = ckpt
        return F.cross_entropy(var(label, x).flatten(0, 1), target.flatten())
    l0, g0 = _loss_and_grads(var, fn, False)
    l1, g1 = _loss_and_grads(var, fn, True)
    assert torch.equal(l0, l1)  # same forward, same drop-path masks
    assert g0.keys() == g1.keys() and len(g0) == sum(1 for p in var.parameters() if p.requires_grad)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    _, g2 = _loss_and_grads(var, fn, True, seed=6)  # other masks → other gradients: the masks did matter
    assert not all(torch.allclose(g2[n], g0[n]) for n in g0)


def test_ecm_checkpointing_same_gradients_and_less_memory():
    var = freeze_backbone(_var())
    torch.manual_seed(2)
    ctl = ECMControlNet(var, **{**CONTROL_PRESETS["tiny"], "every": 2, "offset": 1, "gate_init": 0.5}).train()
    label, x, target = _inputs(var)
    cond = torch.rand(3, 3, 64, 64) * 2 - 1

    def fn(ckpt):
        var.grad_checkpointing = ctl.grad_checkpointing = ckpt
        return F.cross_entropy(ctl(var, label, x, cond_img=cond).flatten(0, 1), target.flatten())
    l0, g0 = _loss_and_grads(ctl, fn, False)
    l1, g1 = _loss_and_grads(ctl, fn, True)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.grad is None for p in var.parameters())  # the backbone stays frozen
    kept = {ckpt: _saved_bytes(lambda ckpt=ckpt: fn(ckpt)) for ckpt in (False, True)}
    # without: every block and adapter keeps its activations; with: what lies outside them (embeddings, ViT, head,
    # loss) plus the block inputs the checkpoints hold (not visible to the hook, ≤ 6 × B·L·C fp32 ≈ 0.6 MB here)
    assert kept[True] < 0.5 * kept[False], kept


def test_checkpointing_is_off_without_grad(monkeypatch):
    """Under no_grad (sampling, validation) nothing is checkpointed: a checkpoint would only cost a wrapper per block
    and adapter. Counted at the two call sites; with grad enabled the same forward checkpoints every block and
    adapter (the positive control)."""
    import ctrlgen.lightning_modules.ecm.control as control_mod
    import ctrlgen.lightning_modules.ecm.var as var_mod

    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(var_mod, "checkpoint", counting)
    monkeypatch.setattr(control_mod, "checkpoint", counting)
    var = _var()
    ctl = ECMControlNet(var, **CONTROL_PRESETS["tiny"]).eval()  # eval: no class or control dropout
    freeze_backbone(var)
    var.grad_checkpointing = ctl.grad_checkpointing = True
    label, x, _ = _inputs(var)
    cond = torch.rand(label.shape[0], 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        a = var(label, x)
        c = ctl(var, label, x, cond_img=cond)
    assert calls == []
    b = var(label, x)
    assert len(calls) == len(var.blocks) and torch.equal(a, b.detach())
    calls.clear()
    d = ctl(var, label, x, cond_img=cond)
    assert len(calls) == len(var.blocks) + len(ctl.adapters) and torch.equal(c, d.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpointing_lowers_cuda_peak_memory():
    """On CUDA under bf16 autocast: peak memory of forward + backward falls, the loss stays the same."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        var = build_var("tiny", depth=8, embed_dim=256, num_heads=4, drop_path_rate=0.0, cond_drop_rate=0.0).train()
    label, x, target = (t.cuda() for t in _inputs(var, B=32))
    peak, loss = {}, {}
    for ckpt in (False, True):
        var.grad_checkpointing = ckpt
        var.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = F.cross_entropy(var(label, x).flatten(0, 1), target.flatten())
        out.backward()
        torch.cuda.synchronize()
        peak[ckpt], loss[ckpt] = torch.cuda.max_memory_allocated() - base, out.item()
    assert loss[True] == loss[False]
    assert peak[True] < 0.6 * peak[False], peak
