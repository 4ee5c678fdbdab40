"""The ShortCoTI demo's claims arithmetic (the full run is `python -m ctrlgen.lightning_modules.apps.shortcoti_demo`)."""

from __future__ import annotations

from ctrlgen.lightning_modules.apps.shortcoti_demo import shortcoti_claims, summarise


def _rows(easy_words, hard_words, reward):
    return {"rows": [{"difficulty": "easy", "words": easy_words, "reward": reward},
                     {"difficulty": "hard", "words": hard_words, "reward": reward}], "fit_s": 1.0, "iterations": 2}


def test_claims_follow_the_measured_means_and_can_fail():
    res = summarise({"none": _rows(20, 24, 0.5), "adaptive": _rows(6, 10, 0.49), "cap": _rows(8, 8, 0.4),
                     "target": _rows(6, 6, 0.45)})
    assert res["adaptive"]["words"] == 8 and res["target"]["hard_easy_ratio"] == 1.0
    claims = {c.name: c for c in shortcoti_claims(res)}
    assert abs(claims["cot_length_reduction"].value - (1 - 8 / 22)) < 1e-12 and claims["cot_length_reduction"].met
    assert claims["task_reward_delta"].met and claims["adaptive_hard_easy_ratio"].met
    assert claims["adaptive_hard_easy_ratio"].target == "> 1.0000"
    worse = shortcoti_claims(summarise({"none": _rows(20, 24, 0.5), "adaptive": _rows(15, 15, 0.3),
                                        "cap": _rows(8, 8, 0.4), "target": _rows(5, 10, 0.45)}))
    assert not any(c.met for c in worse)
