"""The ``sona`` command: ``demo``, ``export``, ``stats``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _state_dir(arg: str | None) -> Path:
    from sona_plugin.models import sona_home

    return Path(arg) if arg else sona_home() / "state"


def cmd_demo(args: argparse.Namespace) -> int:
    from sona_plugin.demo import RULES, run_demo

    rule = RULES[args.rule]
    print(f"sona demo: a simulated user who {rule.description} gives feedback to "
          f"SmolLM2-135M-Instruct; {args.rounds} rounds of {args.per_round} feedback events, "
          f"a background cycle (train, gate, publish, hot-swap) after each.")
    s = run_demo(Path(args.out), rule_name=args.rule, rounds=args.rounds,
                 per_round=args.per_round, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"\nliked on held-out prompts: {s['heldout_liked_before']:.0%} before -> "
          f"{s['heldout_liked_after']:.0%} after {s['feedback']} feedback events "
          f"({s['versions']} adapter versions published, {s['seconds']:.0f} s)")
    for c in s["curve"][1:]:
        print(f"  after {c['feedback']:>4} feedback: held-out {c['heldout_liked']:.0%}, "
              f"stream {c['stream_liked']:.0%}, serving version {c['version']} "
              f"(gate {'passed' if c['gate'] else 'held back the candidate' if c['gate'] is False else 'n/a'})")
        for reason in c.get("gate_reasons") or []:
            print(f"      gate: {reason}")
    print(f"learning curve: {s['plot']}\nPEFT adapter:   {s['adapter']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export what a state directory has learned."""
    from sona_plugin.export import export_patterns, export_peft_from_state, export_preferences

    state = _state_dir(args.state_dir)
    done = False
    if args.path:
        out = export_peft_from_state(state, Path(args.path))
        print(f"PEFT adapter written to {out}")
        done = True
    if args.patterns:
        n = export_patterns(state, Path(args.patterns))
        print(f"{n} patterns written to {args.patterns}")
        done = True
    if args.preferences:
        n = export_preferences(state, Path(args.preferences))
        print(f"{n} preference rows written to {args.preferences}")
        done = True
    if not done:
        print("nothing to export: give PATH, --patterns or --preferences", file=sys.stderr)
        return 2
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sona_plugin.adapters import AdapterRegistry
    from sona_plugin.store import open_store

    state = _state_dir(args.state_dir)
    store = open_store(state / "sona.db")
    reg = AdapterRegistry(state / "adapters")
    cur = reg.current()
    print(json.dumps({"state_dir": str(state), "feedback_records": store.count(),
                      "adapter_versions": [v.version for v in reg.versions()],
                      "current_version": cur.version if cur else None}, indent=1))
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="sona", description="SONA: models that learn from feedback")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="a simulated user teaches the embedded default model")
    d.add_argument("--rule", default="direct", choices=["digits", "direct"],
                   help="the simulated user's preference")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--per-round", type=int, default=50)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="sona-demo", help="output directory (plot, adapter, state)")
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("export", help="export a PEFT adapter, patterns or preference pairs")
    e.add_argument("path", nargs="?", help="directory for the PEFT adapter")
    e.add_argument("--state-dir", help="state directory (default $SONA_HOME/state)")
    e.add_argument("--patterns", help="write the ReasoningBank patterns as JSONL")
    e.add_argument("--preferences", help="write prompt/completion/label rows (TRL KTO) as JSONL")
    e.set_defaults(fn=cmd_export)
    s = sub.add_parser("stats", help="what a state directory holds")
    s.add_argument("--state-dir")
    s.set_defaults(fn=cmd_stats)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
