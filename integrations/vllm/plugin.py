"""vLLM's ``vllm.general_plugins`` entry point: the one launch switch for SONA.

SONA is on when the engine config carries a ``sona`` entry:

    vllm serve MODEL --enable-lora --max-lora-rank 8 --additional-config '{"sona": {}}'

(``{"sona": {...}}`` holds a SonaConfig, flat or nested, host options included).
``register()`` runs in every vLLM process and changes nothing by itself: it hooks the
building of the engine config (``_compat.wrap_engine_config``) so that, only when that
config has ``sona``, the installed vLLM is checked for everything SONA relies on
(``_compat.check``), the worker gets SONA's extension class (``worker_extension_cls``) and
the OpenAI server adds SONA's routes (``server.py``) without anyone setting
``VLLM_PLUGINS`` (``_compat.add_endpoint_plugin`` says why). Without ``sona`` in the
config, vLLM runs exactly as it would without this package.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

EXTENSION = "sona_plugin.integrations.vllm.worker.SonaWorkerExtension"
# the front end's sona settings once a launch config enabled SONA; None: not enabled.
# ``{"sona": {}}`` (what a plain `sona serve` passes) enables it with every default.
_enabled: dict[str, Any] | None = None


def sona_settings(additional_config: Any) -> dict | None:
    """The ``sona`` entry of vLLM's ``additional_config`` (dict or JSON text), or None."""
    if not additional_config:
        return None
    if isinstance(additional_config, str):
        additional_config = json.loads(additional_config)
    s = additional_config.get("sona") if isinstance(additional_config, dict) else None
    if s is None or s is False:
        return None
    return {} if s is True else s


def register() -> None:
    """Re-entrant: every vLLM process calls it, maybe more than once."""
    from . import _compat

    _compat.wrap_engine_config(_enable)
    _compat.add_endpoint_plugin("sona_feedback", _endpoint_plugin, lambda: _enabled is not None)


def _endpoint_plugin():
    from .server import SonaEndpointPlugin

    return SonaEndpointPlugin()


def _enable(cfg: VllmConfig) -> None:
    settings = sona_settings(getattr(cfg, "additional_config", None))
    if settings is None:
        return
    from . import _compat
    from .host import split_settings

    _compat.check(cfg)  # a vLLM without what SONA relies on fails here, naming it
    split_settings(settings)  # a bad option fails the launch, naming it
    pc = cfg.parallel_config
    if pc.worker_extension_cls and pc.worker_extension_cls != EXTENSION:
        raise ValueError(
            f"SONA needs worker_extension_cls={EXTENSION}, but {pc.worker_extension_cls} is set"
        )
    pc.worker_extension_cls = EXTENSION
    if getattr(cfg, "lora_config", None) is None:
        logger.warning(
            "SONA: --enable-lora is off, so BaseLoRA versions cannot be served; "
            "only the MicroLoRA learns"
        )
    global _enabled
    _enabled = dict(settings)
    logger.info("SONA enabled: worker extension %s", EXTENSION)
