"""The worker hooks work under vLLM's default compilation (no LoRA: on CPU, --enable-lora
turns compilation off, so the other vLLM tests run eagerly). A forward hook inside the
compiled region would silently do nothing here; SONA wraps compute_logits, outside it.
Own process: the engine must not share memory with the other modules' engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from vllm import SamplingParams
    from sona_plugin.integrations.vllm import SonaLLM

    def score(llm, p, r):
        ids = p + r
        out = llm.llm.generate([{"prompt_token_ids": ids}],
                               SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                               use_tqdm=False)[0]
        return sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(len(p), len(ids)))

    if __name__ == "__main__":
        llm = SonaLLM(state_dir=tempfile.mkdtemp(), enable_lora=False,
                      kv_cache_memory_bytes=1 << 30, max_model_len=512)
        mode = str(llm.llm.llm_engine.vllm_config.compilation_config.mode)
        out = llm.chat([[{"role": "user", "content": "Tell me about the sea."}]],
                       SamplingParams(max_tokens=16, temperature=0.0))[0]
        p, r = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        before = score(llm, p, r)
        rep = llm.feedback(out.response_id, reward=1.0)
        after = score(llm, p, r)
        llm.close()
        print("RESULT" + json.dumps({"mode": mode, "before": before, "after": after,
                                     "tokens": len(r), "accepted": rep["instant"]["accepted"]}))
""")


def test_feedback_moves_the_model_under_default_compilation(tmp_path):
    script = tmp_path / "compiled.py"
    script.write_text(_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-4000:]
    got = json.loads(line[len("RESULT") :])
    assert "NONE" not in got["mode"], got  # compiled, not eager
    assert got["after"] - got["before"] > 0.05, got
