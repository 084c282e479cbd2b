"""Pairwise judges: the built-in adapters for a local MLX model (:mod:`.llm`), an OpenAI-compatible
endpoint (:mod:`.http`), a Python function (:mod:`.function`) and a person at the terminal
(:mod:`.human`); :mod:`.builtin` lists their factories. The judge contract is in
:mod:`mlx_xpo_plugin.contracts`."""
