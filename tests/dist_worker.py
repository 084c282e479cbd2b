"""Worker for test_distributed: 2 steps on fixed, index-determined completions and verdicts.
argv: model_path data_dir out_file batch_size"""

import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm_lora.utils import from_pretrained

from mlx_xpo_plugin.commands.data import load_prompts
from mlx_xpo_plugin.compute.reference import Reference
from mlx_xpo_plugin.compute.rollout import Completion
from mlx_xpo_plugin.loop.pairs import Pair
from mlx_xpo_plugin.loop.settings import LoopSettings
from mlx_xpo_plugin.loop.trainer import OnlineTrainer
from mlx_xpo_plugin.xpo_trainer import XPO

model_path, data_dir, out_file, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mx.random.seed(0)
model, tok, _ = from_pretrained(
    model_path, lora_config={"rank": 4, "dropout": 0.0, "scale": 10.0, "use_dora": False, "num_layers": -1}
)
train = load_prompts(data_dir, "train", tok, 100)
s = LoopSettings(
    iters=2,
    batch_size=bs,
    alpha=1e-2,
    steps_per_report=1,
    steps_per_eval=100,
    save_every=100,
    adapter_path=out_file + ".d",
    progress=False,
    max_completion_length=4,
)
t = OnlineTrainer(s, XPO(s), model, tok, Reference(model), None, optim.SGD(learning_rate=0.5), train, None)


def fixed_pairs(idx, metrics):
    out = []
    for i in idx:
        rng = np.random.default_rng(i)
        c = Completion([int(x) for x in rng.integers(3, 500, 3 + i % 3)], "c", False)
        r = Completion([int(x) for x in rng.integers(3, 500, 2 + i % 4)], "r", False)
        # every 5th prompt: an invalid verdict (its exploration term still counts)
        out.append(Pair(train.ids[i], train.texts[i], c, r, decided=i % 5 != 0))
    return out


t.collect_pairs = fixed_pairs
t.train()
if t.rank == 0:
    mx.save_safetensors(out_file, dict(tree_flatten(model.trainable_parameters())))
