"""The built-in judge factories, most specific first: ``human`` (100), ``http(s)://`` URLs (90),
``module:callable`` / ``file.py:callable`` (80), and the catch-all local MLX model (0).

Every ``check`` is cheap (no model is loaded; the function judge imports the user's module, which
is the only way to know that the callable exists); heavy modules such as ``mlx_lm`` are imported
inside ``build`` only.
"""

from __future__ import annotations

from mlx_xpo_plugin.contracts import JudgeFactory
from mlx_xpo_plugin.judges import function, http, human, llm

BUILTIN_JUDGE_FACTORIES: list[JudgeFactory] = [
    JudgeFactory("human", human.matches, human.build, human.check, priority=100, uses_judge_system=False),
    JudgeFactory("http", http.matches, http.build, http.check, priority=90),
    JudgeFactory("function", function.matches, function.build, function.check, priority=80, uses_judge_system=False),
    JudgeFactory("llm", llm.matches, llm.build, llm.check, priority=0),
]
