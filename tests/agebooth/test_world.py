"""The faces world: deterministic samples, captions, shards; the analytic age estimator recovers the rendered age and
the identity embedding separates identities while ignoring age."""

from __future__ import annotations

import numpy as np
import pytest
from ctrlgen.lightning_modules.agebooth import world
from scipy.stats import spearmanr


@pytest.mark.parametrize("size", [16, 32])
def test_age_estimator_recovers_rendered_age(size):
    rs = [world.render(0, "test", i, size) for i in range(200)]
    ages = np.array([r["age"] for r in rs])
    est = np.array([world.estimate_age(r["image"]) for r in rs])
    assert spearmanr(ages, est).statistic > 0.95
    assert np.abs(est - ages).mean() < 4.0  # years; jitter (brightness ±4 %) and tints are the only error sources


def test_age_estimator_reads_uint8_and_signed_images():
    img = world.render_portrait(3, 60.0, 32)
    est = world.estimate_age(img)
    assert world.estimate_age((img * 255).round().astype(np.uint8)) == pytest.approx(est, abs=0.5)
    assert world.estimate_age(img * 2 - 1) == pytest.approx(est, abs=1e-6)
    assert world.estimate_age((img * 2 - 1).transpose(2, 0, 1)) == pytest.approx(est, abs=1e-6)
    assert abs(est - 60.0) < 2.0


def test_identity_check_separates_identities_and_ignores_age():
    emb = {(k, a): world.identity_embedding(world.render_portrait(k, a, 32)) for k in range(world.N_IDENTITIES)
           for a in (15.0, 45.0, 75.0)}
    same = [emb[(k, 15.0)] @ emb[(k, a)] for k in range(world.N_IDENTITIES) for a in (45.0, 75.0)]
    diff = [emb[(k, 45.0)] @ emb[(j, 45.0)] for k in range(world.N_IDENTITIES) for j in range(world.N_IDENTITIES)
            if j != k]
    assert min(same) > 0.9 and max(diff) < min(same) - 0.1
    img = world.render_portrait(0, 30.0, 32)
    assert world.identity_similarity(img, img) == pytest.approx(1.0)


def test_samples_are_deterministic_and_captioned():
    a = list(world.samples(0, "train", 4, 32))
    b = list(world.samples(0, "train", 4, 32))
    assert [s["jpg"] for s in a] == [s["jpg"] for s in b]
    for s in a:
        meta = s["json"]
        assert s["txt"] == f"a portrait of {meta['token']} person, {meta['age_word']}"
        assert world.AGE_MIN <= meta["age"] <= world.AGE_MAX
    young = list(world.samples(0, "train", 8, 32, identities=[0], ages=(10, 20)))
    assert all(s["json"]["identity"] == 0 and s["json"]["age"] < 20 and "sbu" in s["txt"] for s in young)
    assert world.age_word(15) == "teenage" and world.age_word(75) == "elderly"


def test_registered_world_writes_shards(tmp_path):
    from ctrlgen.datamodules.shards import iter_samples
    from ctrlgen.datamodules.synth import synth

    out = synth("faces", tmp_path, n_train=6, n_val=2, n_test=0, size=16, shard_size=4)
    assert len(out["train"]) == 2 and "test" not in out
    first = next(iter(iter_samples(out["train"][0])))
    assert {"jpg", "txt", "json"} <= set(first)
