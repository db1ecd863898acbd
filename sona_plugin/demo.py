"""Simulated users with checkable preferences, the prompt sets they judge, and `sona demo`.

The prompts were written for this project: everyday questions in a stream set (what
users ask while the model learns) and a separate held-out set (only ever used to
measure). A simulated user likes an answer when it satisfies its rule and dislikes it
otherwise; the rules are checkable, so "the model learned" is a liked-rate on held-out
prompts, before and after.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sona_plugin.integrations.transformers import SonaPipeline
    from sona_plugin.integrations.vllm import SonaLLM

STREAM_PROMPTS = [
    "What should I eat for breakfast?",
    "How do I keep my plants alive?",
    "Why do cats purr?",
    "What is a good name for a dog?",
    "How can I sleep better?",
    "What is the tallest mountain?",
    "How do I make tea?",
    "Why is the ocean salty?",
    "What is a healthy snack?",
    "How do I start running?",
    "What is the capital of Japan?",
    "Why do leaves change color?",
    "How do I save money?",
    "What is a good hobby?",
    "How do birds fly?",
    "What is the fastest animal?",
    "How do I clean a window?",
    "What is a planet?",
    "Why do we need water?",
    "How do I learn to draw?",
    "What is a volcano?",
    "How do I make friends?",
    "What is the moon made of?",
    "How does a fridge work?",
    "What is a rainbow?",
    "How do I write a letter?",
    "Why do dogs bark?",
    "What is a computer?",
    "How do I cook pasta?",
    "What is the biggest ocean?",
    "How do I stay focused?",
    "What is a cloud?",
    "Why do we dream?",
    "How do I ride a bike?",
    "What is electricity?",
    "How do bees make honey?",
    "What is a good book to read?",
    "How do I wash a car?",
    "Why is grass green?",
    "What is a desert?",
    "How do I tie a tie?",
    "What do pandas eat?",
    "How do I plan a trip?",
    "What is snow?",
    "Why do we sneeze?",
    "How do I bake bread?",
    "What is a library?",
    "How do fish breathe?",
    "What is the sun?",
    "How do I paint a room?",
    "What is a river?",
    "Why do we yawn?",
    "How do I grow tomatoes?",
    "What is a museum?",
    "How does a phone work?",
    "What is the weather like in spring?",
    "How do I fold a shirt?",
    "What is a forest?",
    "Why do stars twinkle?",
    "How do I make a salad?",
    "What is a good exercise?",
    "How do I learn a song?",
    "What is a bridge?",
    "Why do onions make you cry?",
    "How do I care for a goldfish?",
    "What is thunder?",
    "How do I choose a gift?",
    "What is a lake?",
    "How do I make soup?",
    "Why do we have seasons?",
    "What is a good movie?",
    "How do airplanes stay up?",
    "What is an island?",
    "How do I relax after work?",
    "What is a robot?",
    "How do I brush my teeth properly?",
    "What is a hurricane?",
    "Why is the sky dark at night?",
    "How do I make a sandwich?",
    "What is a farm?",
    "How do magnets work?",
    "What is a good game to play?",
    "How do I organize my desk?",
    "What is a cave?",
    "Why do we need sleep?",
    "How do I make pancakes?",
    "What is a city?",
    "How do plants grow?",
    "What is an earthquake?",
    "How do I learn to swim?",
    "What is a good breakfast drink?",
    "How do I fix a flat tire?",
    "What is a glacier?",
    "Why do birds sing?",
    "How do I make lemonade?",
    "What is a castle?",
    "How do I study for a test?",
    "What is a storm?",
    "How do trains work?",
    "What is a garden?",
    "How do I walk a dog?",
    "What is wind?",
    "Why do apples fall?",
    "How do I wrap a present?",
    "What is a beach?",
    "How do I keep warm in winter?",
    "What is a zoo?",
    "How do I make coffee?",
    "What is a good song?",
    "How do I clean my room?",
    "What is fog?",
    "Why do we laugh?",
    "How do I start a journal?",
    "What is a mountain?",
    "How do I make rice?",
    "What is a school?",
    "How do clocks work?",
]

HELDOUT_PROMPTS = [
    "What is a good pet?",
    "How do I make toast?",
    "Why do we blink?",
    "What is a valley?",
    "How do I learn to cook?",
    "What is a comet?",
    "How do I water a cactus?",
    "Why do cows moo?",
    "What is a good lunch?",
    "How do I keep my shoes clean?",
    "What is a canyon?",
    "How do I fall asleep fast?",
    "Why do we shiver?",
    "What is a good board game?",
    "How do I make popcorn?",
    "What is a waterfall?",
    "How do I stay healthy?",
    "Why is snow white?",
    "What is a good dessert?",
    "How do I read faster?",
    "What is a meadow?",
    "How do kites fly?",
    "Why do we get hungry?",
    "What is a good way to exercise at home?",
    "How do I make a smoothie?",
    "What is a tornado?",
    "How do I learn a new word?",
    "Why do flowers smell nice?",
    "What is a pond?",
    "How do I make a bed?",
    "What is a good winter activity?",
    "How do I boil water?",
]


@dataclass(frozen=True)
class Rule:
    """A simulated user's preference: likes an answer iff ``check(answer)``."""

    name: str
    description: str
    check: Callable[[str], bool]


def _has_digit(text: str) -> bool:
    return bool(re.search(r"\d", text))


def _addresses_reader(text: str) -> bool:
    return bool(re.search(r"\byou(r|rs|rself)?\b", text, re.IGNORECASE))


RULES = {
    "digits": Rule("digits", "likes answers that contain a number written in digits", _has_digit),
    "direct": Rule(
        "direct", "likes answers that speak to the reader (say 'you')", _addresses_reader
    ),
}
"""Two preference tasks with different rules. Base rates on SmolLM2-135M-Instruct (32
held-out prompts greedy / 48 stream prompts sampled, 40 new tokens): digits 22 % / 12 %,
direct 25 % / 27 %."""


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def answers(
    pipe: SonaPipeline | SonaLLM,
    prompts: list[str],
    *,
    sample: bool,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict]:
    """Generate one answer per prompt: (response_id, text). ``pipe`` is a SonaPipeline
    or a vLLM ``SonaLLM``."""
    if hasattr(pipe, "llm"):
        from vllm import SamplingParams

        sp = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=1.0 if sample else 0.0,
            top_p=0.95 if sample else 1.0,
            seed=seed,
        )
        outs = pipe.chat([chat(p) for p in prompts], sp)
        return [{"response_id": o.response_id, "text": o.outputs[0].text} for o in outs]
    import torch

    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 0.95} if sample else {"do_sample": False}
    outs = pipe(
        [chat(p) for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size, **kw
    )
    return [
        {"response_id": o[0]["response_id"], "text": o[0]["generated_text"][-1]["content"]}
        for o in outs
    ]


def liked_rate(
    pipe: SonaPipeline | SonaLLM,
    rule: Rule,
    prompts: list[str],
    max_new_tokens: int,
    *,
    sample: bool = False,
    seed: int = 0,
) -> float:
    """Share of answers to ``prompts`` that ``rule`` likes: greedy ones, or (``sample``)
    the sampled answers users get (with best-of-k serving on, the served best of k)."""
    outs = answers(pipe, prompts, sample=sample, max_new_tokens=max_new_tokens, seed=seed)
    return sum(rule.check(o["text"]) for o in outs) / len(outs)


def run_demo(
    out_dir: Path,
    rule_name: str = "direct",
    rounds: int = 3,
    per_round: int = 50,
    max_new_tokens: int = 40,
    seed: int = 0,
    progress: bool = True,
    candidates: int = 1,
) -> dict:
    """`sona demo`: a simulated user teaches the embedded default model its preference.

    With ``candidates`` k > 1 the pipeline serves the best of k sampled answers by a
    reward model of the feedback (``rerank_candidates``, ``sona_plugin.rerank``); the
    user judges those, and the held-out prompts are measured twice: greedy answers (what
    the trained versions do) and sampled ones as served (what users get), seeded alike at
    every checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    from sona_plugin.integrations.transformers import pipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rule = RULES[rule_name]
    out_dir = Path(out_dir)
    state = out_dir / "state"
    if state.exists():
        import shutil

        shutil.rmtree(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = pipeline(state_dir=state, sona_config={"rerank_candidates": candidates})
    held = HELDOUT_PROMPTS

    def served() -> float | None:
        if candidates == 1:
            return None
        return liked_rate(pipe, rule, held, max_new_tokens, sample=True, seed=seed + 10_000)

    before = liked_rate(pipe, rule, held, max_new_tokens)
    served_before = served()
    rng = random.Random(seed)
    stream = STREAM_PROMPTS[:]
    rng.shuffle(stream)
    curve = [
        {
            "feedback": 0,
            "heldout_liked": before,
            "heldout_served": served_before,
            "stream_liked": None,
            "version": None,
        }
    ]
    n = 0
    bar = tqdm(
        total=rounds * per_round,
        desc=f"feedback ({rule.description})",
        disable=not progress,
        unit="fb",
    )
    for k in range(rounds):
        prompts = [stream[(k * per_round + i) % len(stream)] for i in range(per_round)]
        outs = answers(pipe, prompts, sample=True, max_new_tokens=max_new_tokens, seed=seed + k)
        liked = 0
        for o in outs:
            like = rule.check(o["text"])
            liked += like
            pipe.feedback(o["response_id"], liked=like)
            n += 1
            bar.update()
        rep = pipe.learn(epochs=2, probe=True)
        held_now = liked_rate(pipe, rule, held, max_new_tokens)
        curve.append(
            {
                "feedback": n,
                "heldout_liked": held_now,
                "heldout_served": served(),
                "stream_liked": liked / len(outs),
                "version": pipe.adapter_version,
                "published": rep.get("published"),
                "gate": rep.get("gate", {}).get("passed"),
                "gate_reasons": rep.get("gate", {}).get("reasons", []),
            }
        )
        bar.set_postfix(heldout=f"{held_now:.0%}", version=pipe.adapter_version)
    bar.close()
    after = curve[-1]["heldout_liked"]
    adapter = pipe.export_peft(out_dir / "adapter")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [c["feedback"] for c in curve],
        [100 * c["heldout_liked"] for c in curve],
        "o-",
        label="held-out prompts (greedy)",
    )
    if candidates > 1:
        ax.plot(
            [c["feedback"] for c in curve],
            [100 * c["heldout_served"] for c in curve],
            "^-",
            label=f"held-out prompts (sampled, best of {candidates})",
        )
    ax.plot(
        [c["feedback"] for c in curve[1:]],
        [100 * c["stream_liked"] for c in curve[1:]],
        "s--",
        label="stream answers (sampled, as judged)"
        if candidates == 1
        else f"stream answers (best of {candidates}, as judged)",
    )
    ax.set_xlabel("feedback events")
    ax.set_ylabel("liked by the simulated user (%)")
    ax.set_title(f"SONA on SmolLM2-135M: user {rule.description}", fontsize=9)
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=120)
    summary = {
        "rule": rule.name,
        "heldout_liked_before": before,
        "heldout_liked_after": after,
        "candidates": candidates,
        "heldout_served_before": served_before,
        "heldout_served_after": curve[-1]["heldout_served"],
        "feedback": n,
        "versions": len(pipe.adapters()),
        "curve": curve,
        "adapter": str(adapter),
        "plot": str(out_dir / "learning_curve.png"),
        "seconds": time.time() - t0,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    pipe.close()
    return summary
