"""Host integrations (transformers, vLLM), installed as ``sona_plugin.integrations``."""
