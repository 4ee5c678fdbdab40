"""The one batch-size rule (``batch_size_of``: logging weights, throughput) and the one no-decay rule
(``decay_groups``, with per-prefix keyword lists)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn



def test_batch_size_of_dicts_streams_lists_and_none():
    from ctrlgen.lightning_modules.common.recipe import batch_size_of

    assert batch_size_of({"_data_health": torch.zeros(2), "key": ["a", "b", "c"], "image": torch.zeros(3, 1)}) == 3
    assert batch_size_of({"deep": {"image": torch.zeros(5)}, "shallow": {"image": torch.zeros(2)}}) == 5
    assert batch_size_of([torch.zeros(4, 2), torch.zeros(1)]) == 4
    assert batch_size_of(({"image": torch.zeros(6)},)) == 6
    assert batch_size_of({"scalar": torch.tensor(1.0), "key": ["a"]}) is None
    assert batch_size_of("text") is None


def test_throughput_counts_samples_with_the_same_rule(monkeypatch):
    from ctrlgen.callbacks.throughput import ThroughputCallback as CB

    logged = {}
    cb = CB(warmup_steps=0)
    module = SimpleNamespace(device=torch.device("cpu"), tokens_in_step=None,
                             log_dict=lambda d, **kw: logged.update(d))
    trainer = SimpleNamespace(global_step=1, world_size=2)
    batch = {"deep": {"image": torch.zeros(5)}}  # a multi-stream batch: its first stream's size, as the logging
    cb.on_train_batch_start(trainer, module, batch, 0)
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    dt = logged["perf/step_time_s"]
    assert logged["perf/samples_per_sec"] == 5 / dt and logged["perf/samples_per_sec_all_ranks"] == 10 / dt


def test_decay_groups_per_prefix_longest_wins():
    from ctrlgen.lightning_modules.common.base import decay_groups

    net = nn.ModuleDict({"var": nn.ModuleDict({"class_emb": nn.Embedding(3, 4), "pos_1LC": nn.Linear(4, 4)}),
                         "ctl": nn.ModuleDict({"class_emb": nn.Embedding(3, 4), "gates": nn.Linear(4, 4)}),
                         "frozen": nn.Linear(4, 4).requires_grad_(False)})
    net["var"]["inner"] = nn.Linear(4, 4)
    names = {id(p): n for n, p in net.named_parameters()}
    groups = decay_groups(net.named_parameters(), ("class_emb", "gates"),
                          {"var.": ("pos_1LC",), "var.inner.": ("inner",)})
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in groups)
    assert groups[1]["weight_decay"] == 0.0
    assert decay == {"var.class_emb.weight"}  # the VAR's list decays class_emb; the default list would not
    assert no_decay == {"var.pos_1LC.weight", "var.pos_1LC.bias", "var.inner.weight", "var.inner.bias",
                        "ctl.class_emb.weight", "ctl.gates.weight", "ctl.gates.bias"}
