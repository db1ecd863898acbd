"""Export what SONA learned: a PEFT adapter, the pattern bank, preference pairs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import StateError
from .micro_lora import MicroLoRA
from .store.base import FeedbackRecord


def write_peft_export(
    path: Path,
    micro: MicroLoRA,
    lm_head_weight: Any,
    base_adapter_dir: Path | None,
    base_model: str | None,
) -> Path:
    """A PEFT adapter directory: the BaseLoRA (if any) plus the MicroLoRA folded into ``lm_head``.

    ``W (h + s B A h) = W h + (s W B)(A h)``: ``lora_A = A``, ``lora_B = s W B`` with PEFT
    scaling 1 for ``lm_head`` (``rank_pattern``/``alpha_pattern``). No embedding weights
    are written, so the adapter stays small on tied-embedding models.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fold = micro.to_lm_head_lora(lm_head_weight)
    r = int(fold["r"])
    tensors: dict[str, torch.Tensor] = {}
    if base_adapter_dir is not None:
        base_cfg = json.loads((Path(base_adapter_dir) / "adapter_config.json").read_text())
        tensors.update(load_file(str(Path(base_adapter_dir) / "adapter_model.safetensors")))
        targets = sorted(set(base_cfg["target_modules"]) | {"lm_head"})
        cfg = LoraConfig(
            r=base_cfg["r"],
            lora_alpha=base_cfg["lora_alpha"],
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            rank_pattern={"lm_head": r},
            alpha_pattern={"lm_head": r},
        )
    else:
        cfg = LoraConfig(
            r=r, lora_alpha=r, target_modules=["lm_head"], bias="none", task_type="CAUSAL_LM"
        )
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.from_numpy(
        fold["lora_A"]
    ).contiguous()
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.from_numpy(
        fold["lora_B"]
    ).contiguous()
    cfg.base_model_name_or_path = base_model
    cfg.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def _load_state(state_dir: Path) -> tuple[Any, dict]:
    from .engine import SonaEngine

    info_path = Path(state_dir) / "pipeline.json"
    if not info_path.exists():
        raise StateError(
            f"{state_dir} holds no saved pipeline state (pipeline.json); run the "
            f"pipeline (it saves on learn() and close()) or pass the right --state-dir"
        )
    info = json.loads(info_path.read_text())
    return SonaEngine.load(Path(state_dir) / "engine"), info


def export_peft_from_state(state_dir: Path, path: Path) -> Path:
    """``sona export PATH``: the served BaseLoRA plus the saved MicroLoRA, as PEFT."""
    import torch
    from transformers import AutoModelForCausalLM

    from .adapters import AdapterRegistry

    engine, info = _load_state(state_dir)
    source = info.get("model_source")
    if not source:
        raise StateError(
            "the saved pipeline did not record its model's path; export from the "
            "live pipeline with pipe.export_peft(path)"
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    cur = AdapterRegistry(Path(state_dir) / "adapters").current()
    return write_peft_export(
        path,
        engine.micro_lora,
        model.get_output_embeddings().weight,
        cur.path if cur else None,
        source,
    )


def export_patterns(state_dir: Path, out: Path) -> int:
    """The ReasoningBank's patterns as JSONL (one LearnedPattern per line)."""
    engine, _ = _load_state(state_dir)
    pats = engine.reasoning_bank.patterns
    with open(out, "w") as f:
        for p in pats:
            f.write(json.dumps(p.to_dict()) + "\n")
    return len(pats)


def _all_records(store: Any, page: int = 1000) -> Iterator[FeedbackRecord]:
    """Every live record, oldest first, read a page at a time (a long deployment's store
    does not fit in memory at once)."""
    since = 0
    while batch := store.records(since_id=since, limit=page):
        yield from batch
        since = batch[-1].id


def export_preferences(state_dir: Path, out: Path) -> int:
    """Stored feedback as prompt/completion/label rows (TRL's KTO format); neutral rewards
    (0) are left out."""
    from .store import open_store

    store = open_store(Path(state_dir) / "sona.db")
    n = 0
    try:
        with open(out, "w") as f:
            for r in _all_records(store):
                if r.reward == 0:
                    continue
                f.write(
                    json.dumps(
                        {
                            "prompt": r.prompt,
                            "completion": r.response_text,
                            "label": bool(r.reward > 0),
                            "reward": r.reward,
                            "response_id": r.response_id,
                        }
                    )
                    + "\n"
                )
                n += 1
    finally:
        store.close()
    return n


__all__ = ["export_patterns", "export_peft_from_state", "export_preferences", "write_peft_export"]
