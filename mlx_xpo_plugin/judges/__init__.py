"""Pairwise judges: the protocol (:mod:`.base`) and the built-in adapters: a local MLX model
(:mod:`.llm`), an OpenAI-compatible endpoint (:mod:`.http`), a Python function (:mod:`.function`)
and a person at the terminal (:mod:`.human`); :mod:`.builtin` lists their factories."""

from .base import JudgeContext, JudgeFactory, PairwiseJudge, Verdict

__all__ = ["Verdict", "PairwiseJudge", "JudgeContext", "JudgeFactory"]
