"""How large the gate's held-out score differences are against their noise: for every
published version of a saved deployment, the reward-centred held-out score difference
with the version before it (the base model for v1) on the gate's current window of
held-out records (40 by default), its paired standard error and their ratio.

    python benchmarks/gate_noise.py STATE_DIR

``STATE_DIR`` is a pipeline's state directory (``benchmarks/long_horizon.py --state-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sona_plugin.config import SonaConfig  # noqa: E402
from sona_plugin.learner.heldout import PromptSplit  # noqa: E402
from sona_plugin.learner.state import STATE_FILE, load_state  # noqa: E402
from sona_plugin.store import open_store  # noqa: E402
from sona_plugin.training.gate import _scores, paired_se  # noqa: E402
from sona_plugin.training.objective import mean_response_logprob  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--records", type=int, default=SonaConfig().gate_heldout_records, help="window size"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    st = args.state_dir
    arrays, meta = load_state(st / STATE_FILE)
    split = PromptSplit.from_state(arrays, meta["split"])
    with open_store(st / "sona.db") as store:
        held = store.records_with_ids(split.ids(held=True).tolist())
    held = held[-args.records :]
    source = json.loads((st / "pipeline.json").read_text())["model_source"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    versions = sorted(int(p.name[1:]) for p in (st / "adapters").glob("v0*"))
    print(f"{len(held)} held-out records, {np.mean([r.reward > 0 for r in held]):.0%} liked")
    with torch.no_grad():
        lp = {0: mean_response_logprob(model, held, 8)}
        for v in versions:
            path = st / "adapters" / f"v{v:06d}"
            if v == versions[0]:
                model = PeftModel.from_pretrained(model, path, adapter_name=f"v{v}")
            else:
                model.load_adapter(path, adapter_name=f"v{v}")
            model.set_adapter(f"v{v}")
            lp[v] = mean_response_logprob(model, held, 8)
    before = 0
    for v in versions:
        diff = _scores(lp[v], held)[0] - _scores(lp[before], held)[0]
        se = paired_se(lp[v], lp[before], held)
        print(
            f"v{v} against {'base' if before == 0 else f'v{before}'}: score {diff:+.4f}, "
            f"paired SE {se:.4f}, {diff / se:+.2f} SE"
        )
        before = v


if __name__ == "__main__":
    main()
