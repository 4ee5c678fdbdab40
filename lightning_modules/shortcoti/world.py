"""ShortCoTI's synthetic world: counted colour/shape scenes rendered as image-token grids, an analytic checker and
verbose CoTs (for ``ctrlgen demo shortcoti``, CPU, a tiny Janus).

- **Prompts.** An *easy* prompt names one group ("two red cubes"), a *hard* one two groups of distinct colour/shape
  ("a blue star and three green rings"); counts 1–2 (easy) or 1–3 (hard); 4 colours × 4 shapes, all words in the
  policy's world vocabulary. Records follow T2I-R1's JSONL schema: ``prompt``, ``task_type`` (``numeracy``),
  ``difficulty`` (``easy``/``hard``), ``numeracy_info`` [{obj_name, color, num}]. :func:`split_prompts` keeps
  held-out prompt strings out of training.
- **Scenes as tokens.** An image is ``n_tokens`` cells (the tiny Janus' 4×4 = 16 image tokens) over a codebook of
  ≥ 17 codes: object code ``1 + 4·colour + shape`` (1…16) repeated ``count`` times, groups in prompt order (reading order),
  then random background codes (17 … 16 + ``n_background``). :func:`render` draws a scene for a prompt.
- **Checker.** :class:`SceneChecker` (a :class:`~.rewards.RewardFn`) parses the **original** prompt and scores the
  image tokens with T2I-R1's numeracy shape: per group 1 if the object code appears exactly ``count`` times, 0.2 if
  it appears with a wrong count, 0 if absent; mean over groups, times (1 − cells holding an object code the prompt
  does not name / cells). Exact, deterministic, in [0, 1].
- **CoTs.** :func:`make_cot`: a plan that restates the groups ("draw : two red cubes , a blue star .") followed by
  0 … ``max_filler`` filler sentences (true but useless: "the scene is drawn on a plain background ."), so a
  pretrained policy is verbose and a shorter CoT can carry the same plan.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from ctrlgen.lightning_modules.shortcoti.rewards import RewardFn

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("cube", "sphere", "star", "ring")
PLURAL = {s: s + "s" for s in SHAPES}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
N_OBJECT_CODES = len(COLOURS) * len(SHAPES)
FILLER = (
    "the scene is drawn on a plain background .",
    "each object is clearly visible .",
    "the edges are smooth and flat .",
    "it is a simple picture .",
    "the colors are very bright .",
    "this image shows simple flat shapes .",
    "objects are placed on a plain canvas .",
    "only the objects are visible in this scene .",
)
_GROUP = re.compile(r"(a|an|one|two|three|four|five|six)\s+(" + "|".join(COLOURS) + r")\s+(" + "|".join(
    s + "s?" for s in SHAPES) + r")\b")


def object_code(colour: str, shape: str) -> int:
    """Codebook id of a (colour, shape) object: 1 + 4·colour + shape (1 … 16)."""
    return 1 + COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def group_text(count: int, colour: str, shape: str) -> str:
    return f"{'a' if count == 1 else NUMBERS[count]} {colour} {shape if count == 1 else PLURAL[shape]}"


def parse_prompt(prompt: str) -> list[tuple[int, str, str]]:
    """(count, colour, shape) of every group the prompt names, in order."""
    out = []
    for num, colour, shape in _GROUP.findall(prompt.lower()):
        count = 1 if num in ("a", "an") else NUMBERS.index(num)
        out.append((count, colour, shape.removesuffix("s") if shape.endswith("s") and shape[:-1] in SHAPES
                    else shape))
    return out


def make_prompt(rng: random.Random, hard: bool) -> dict:
    """One prompt record (module docstring)."""
    n_groups, max_count = (2, 3) if hard else (1, 2)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n_groups)
    groups = [(rng.randint(1, max_count), c, s) for c, s in pairs]
    return {"prompt": " and ".join(group_text(*g) for g in groups), "task_type": "numeracy",
            "difficulty": "hard" if hard else "easy",
            "numeracy_info": [{"obj_name": s, "color": c, "num": n} for n, c, s in groups]}


def all_prompts() -> list[dict]:
    """Every distinct prompt of the world (easy and hard), in a fixed order."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    out = []
    for (c, s) in pairs:
        for n in (1, 2):
            out.append({"prompt": group_text(n, c, s), "task_type": "numeracy", "difficulty": "easy",
                        "numeracy_info": [{"obj_name": s, "color": c, "num": n}]})
    for i, a in enumerate(pairs):
        for b in pairs[i + 1:]:
            for n1 in (1, 2, 3):
                for n2 in (1, 2, 3):
                    out.append({"prompt": f"{group_text(n1, *a)} and {group_text(n2, *b)}", "task_type": "numeracy",
                                "difficulty": "hard",
                                "numeracy_info": [{"obj_name": a[1], "color": a[0], "num": n1},
                                                  {"obj_name": b[1], "color": b[0], "num": n2}]})
    return out


def split_prompts(n_train: int, n_val: int, seed: int = 0, hard_frac: float = 0.5) -> tuple[list[dict], list[dict]]:
    """Train / held-out prompt lists with ``hard_frac`` hard prompts each: the held-out prompts are distinct and never
    in training; training prompts are drawn from the rest (repeating when asked for more than there are)."""
    rng = random.Random(seed)
    train: list[dict] = []
    val: list[dict] = []
    for kind in ("hard", "easy"):
        pool = [p for p in all_prompts() if p["difficulty"] == kind]
        rng.shuffle(pool)
        k_val = round(n_val * hard_frac) if kind == "hard" else n_val - round(n_val * hard_frac)
        k_train = round(n_train * hard_frac) if kind == "hard" else n_train - round(n_train * hard_frac)
        if k_val >= len(pool):
            raise ValueError(f"the world has {len(pool)} {kind} prompts: hold out fewer than that ({k_val} asked)")
        val += pool[:k_val]
        rest = pool[k_val:]
        train += [rest[i % len(rest)] for i in range(k_train)]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def render(prompt: str, rng: random.Random, n_tokens: int = 16, n_background: int = 4) -> list[int]:
    """A scene's image tokens in reading order: each group's object code ``count`` times (groups in prompt order),
    then random background codes."""
    tokens = [object_code(colour, shape) for count, colour, shape in parse_prompt(prompt) for _ in range(count)]
    if len(tokens) > n_tokens:
        raise ValueError(f"{prompt!r} names {len(tokens)} objects but a scene has {n_tokens} cells")
    return tokens + [N_OBJECT_CODES + 1 + rng.randrange(n_background) for _ in range(n_tokens - len(tokens))]


def make_cot(prompt: str, rng: random.Random, max_filler: int = 4, min_filler: int = 0) -> str:
    """A verbose CoT: the plan (every group restated) then ``min_filler`` … ``max_filler`` filler sentences."""
    plan = " , ".join(group_text(*g) for g in parse_prompt(prompt))
    filler = rng.sample(FILLER, rng.randint(min_filler, max_filler))
    return " ".join([f"draw : {plan} .", *filler])


def check(prompt: str, tokens: Sequence[int]) -> float:
    """The checker's score of one token grid against the prompt (module docstring)."""
    groups = parse_prompt(prompt)
    if not groups:
        return 0.0
    tokens = [int(t) for t in tokens]
    named = {object_code(c, s) for _, c, s in groups}
    scores = []
    for count, colour, shape in groups:
        seen = tokens.count(object_code(colour, shape))
        scores.append(1.0 if seen == count else 0.2 if seen else 0.0)
    spurious = sum(1 for t in tokens if 1 <= t <= N_OBJECT_CODES and t not in named)
    return sum(scores) / len(scores) * (1.0 - spurious / len(tokens))


class SceneChecker(RewardFn):
    """The analytic checker as a reward: :func:`check` of each rollout's image tokens against its original prompt."""

    range = (0.0, 1.0)

    def __init__(self, name: str = "checker"):
        self.name = name

    def __call__(self, prompts, metas, tokens, images):
        rows = tokens.detach().cpu().tolist()
        return torch.tensor([check(p, t) for p, t in zip(prompts, rows)], dtype=torch.float64)
