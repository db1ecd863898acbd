"""How well the swap canary tells the right weights from wrong ones, on SmolLM2.

    python benchmarks/canary.py --out results/canary.json

Publishes two versions from a few feedbacks (transformers host), then measures the
relative L2 error of the canary hidden state (``sona_plugin.learner.canary``) for: each
version served as published (what a correct swap gives), the other version's weights
(a stale adapter), the base model (an adapter silently not applied), and the version with
its ``lora_B`` × 1.5 (half-applied weights). The tolerance (1e-3) must sit between the
first and the rest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/canary.json")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from sona_plugin.integrations.transformers import pipeline
    from sona_plugin.learner import canary
    from sona_plugin.models import default_llm_path

    torch.set_num_threads(2)
    state = Path(tempfile.mkdtemp(prefix="sona-canary-"))
    p = pipeline(state_dir=state)
    questions = [
        "Name a number.",
        "Name a fruit.",
        "Count to three.",
        "Name a planet.",
        "What is rain?",
        "Name a tool.",
    ]
    for k in range(2):
        for i, q in enumerate(questions):
            out = p([{"role": "user", "content": q}], max_new_tokens=12, do_sample=False)
            p.feedback(out[0]["response_id"], liked=(i + k) % 2 == 0)
        assert p.learn(epochs=1, gate=False, probe=False)["published"]
    served = {v: p.registry.get(v) for v in (1, 2)}
    p.close()

    def hidden(path: Path | None, ids: list[int]):
        base = AutoModelForCausalLM.from_pretrained(
            default_llm_path(), dtype=torch.float32, local_files_only=True
        )
        model = PeftModel.from_pretrained(base, str(path)) if path is not None else base
        return canary.last_hidden(model.eval(), ids)

    ids, want2 = canary.read(served[2].path)
    _, want1 = canary.read(served[1].path)
    tampered = state / "tampered"
    tampered.mkdir()
    (tampered / "adapter_config.json").write_bytes(
        (served[2].path / "adapter_config.json").read_bytes()
    )
    w = load_file(str(served[2].path / "adapter_model.safetensors"))
    save_file(
        {k: t * 1.5 if "lora_B" in k else t for k, t in w.items()},
        str(tampered / "adapter_model.safetensors"),
    )
    h2 = hidden(served[2].path, ids)
    result = {
        "tolerance": canary.TOLERANCE,
        "v1_as_published": canary.relative_error(hidden(served[1].path, ids), want1),
        "v2_as_published": canary.relative_error(h2, want2),
        "v1_weights_against_v2_canary (stale)": canary.relative_error(
            hidden(served[1].path, ids), want2
        ),
        "base_model_against_v2_canary (not applied)": canary.relative_error(
            hidden(None, ids), want2
        ),
        "v2_lora_B_x1.5 (half-applied)": canary.relative_error(hidden(tampered, ids), want2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
