"""Tokens/s of SmolLM2-135M with and without SONA, same prompts, side by side in one run.

    python benchmarks/overhead.py [--prompts 16] [--tokens 32] [--repeats 3] [--batch-size 1]

Three configurations, interleaved (A B C, A B C, ...) so drift in machine load hits all
alike; each generates exactly ``--tokens`` new tokens per prompt (greedy,
min_new_tokens = max_new_tokens):

* plain: transformers' text-generation pipeline, no SONA;
* recording: SONA's hooks record hidden states and top-k log-probs, MicroLoRA off;
* recording + MicroLoRA: the full SONA request path.

Reported: median tokens/s per configuration and the ratios to plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sona_plugin.demo import HELDOUT_PROMPTS, STREAM_PROMPTS, chat  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import pipeline as hf_pipeline

    from sona_plugin.integrations.transformers import pipeline
    from sona_plugin.models import default_llm_path

    path = default_llm_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    plain = hf_pipeline(
        "text-generation",
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
        tokenizer=tok,
    )
    sona = pipeline(state_dir=tempfile.mkdtemp(prefix="sona-overhead-"))
    # give the MicroLoRA something to apply: a few feedbacks
    warm = sona([chat(p) for p in STREAM_PROMPTS[:4]], max_new_tokens=8, do_sample=False)
    for i, o in enumerate(warm):
        sona.feedback(o[0]["response_id"], 1.0 if i % 2 else -1.0)
    prompts = [chat(p) for p in HELDOUT_PROMPTS[: args.prompts]]
    kw = {
        "max_new_tokens": args.tokens,
        "min_new_tokens": args.tokens,
        "do_sample": False,
        "batch_size": args.batch_size,
    }

    def run(p) -> float:
        t0 = time.perf_counter()
        p(prompts, **kw)
        return len(prompts) * args.tokens / (time.perf_counter() - t0)

    def plain_run() -> float:
        return run(plain)

    def recording_run() -> float:
        sona.engine.set_enabled(False)
        try:
            return run(sona)
        finally:
            sona.engine.set_enabled(True)

    def full_run() -> float:
        return run(sona)

    configs = {
        "plain transformers": plain_run,
        "SONA recording only": recording_run,
        "SONA recording + MicroLoRA": full_run,
    }
    for f in configs.values():  # warm-up
        f()
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for k, f in configs.items():
            rates[k].append(f())
    base = statistics.median(rates["plain transformers"])
    print(
        f"{len(prompts)} prompts x {args.tokens} new tokens, batch {args.batch_size}, "
        f"{args.threads} threads, {args.repeats} interleaved repeats (median tokens/s)"
    )
    for k, v in rates.items():
        m = statistics.median(v)
        print(
            f"  {k:<28} {m:8.1f} tok/s   ratio {m / base:.3f}   "
            f"(runs: {', '.join(f'{x:.1f}' for x in v)})"
        )
    sona.close()


if __name__ == "__main__":
    main()
