"""One TRL 1.13.0 training run (XPO or Online DPO) on PyTorch CPU, started by bench_trl.py.

    bench/.trl-venv/bin/python bench/_trl_side.py SPEC.json OUT.json

Runs in the TRL virtual environment (torch 2.13.0 CPU, trl 1.13.0, peft), not in the project's:
nothing here imports MLX or mlx_xpo_plugin. SPEC:

    {"mode": "xpo" | "online_dpo", "model": <model folder>, "data": <folder with train.jsonl>,
     "iters": N, "batch_size": 2, "max_completion_length": L, "temperature": 0.8,
     "learning_rate": 1e-5, "beta": 0.1, "alpha": 1e-5, "seed": 0, "threads": 2,
     "lora": {"rank": 8, "scale": 10.0, "dropout": 0.0}, "rules": <path of mlx_xpo_plugin/rules.py>,
     "output_dir": <scratch folder>}

The model folder is the one our side trains (mlx-lm layout, which transformers loads as
Qwen2ForCausalLM in fp32 as it is). The preference signal:
* online_dpo: TRL accepts Python reward functions, so it gets the same ``letter_e_reward`` as our
  side (loaded from rules.py by path, wrapped in TRL's batched signature).
* xpo: TRL 1.13's XPOTrainer scores with ``get_reward(model, input_ids, ...)``, i.e. only a
  sequence-classification model; it gets a tiny random-weight Qwen2ForSequenceClassification
  (hidden 64, 2 layers, num_labels 1) on the policy's vocabulary.

Measured: per-step wall time between consecutive ``on_step_end`` callbacks (step 1 has no
predecessor and is not counted), TRL's time in its reward computation (timed from outside),
generated tokens per completion (``truncate_right``'s mask), RSS after the imports and the
process's peak RSS (VmHWM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from _proc import proc_status_kb, run_facts  # noqa: E402  (bench/ is sys.path[0] when run as a script)


def torch_blas() -> str:
    """The BLAS torch was built with (``BLAS_INFO`` in its build settings; mkl for the CPU wheels)."""
    import torch

    cfg = torch.__config__.show()
    return cfg.split("BLAS_INFO=", 1)[1].split(",", 1)[0] if "BLAS_INFO=" in cfg else "unknown"


def load_rules(path: str):
    """mlx_xpo_plugin/rules.py by file path (it imports nothing from the package or MLX)."""
    spec = importlib.util.spec_from_file_location("_bench_rules", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def batched_reward(fn):
    """A pointwise ``fn(prompt, completion) -> float`` in TRL's reward-function signature."""

    def text(x):
        if isinstance(x, list):  # conversational: a list of messages
            return "".join(m.get("content", "") for m in x)
        return x

    def reward(prompts, completions, **kwargs):
        return [fn(text(p), text(c)) for p, c in zip(prompts, completions)]

    reward.__name__ = fn.__name__
    return reward


def tiny_reward_model(vocab_size: int, pad_token_id: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        num_labels=1,
        pad_token_id=pad_token_id,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return Qwen2ForSequenceClassification(cfg).float().eval()


class Recorder:
    """Step-end timestamps, reward seconds per step, generated tokens per completion."""

    def __init__(self):
        self.t, self.reward_s, self.lengths, self.acc = [], [], [], 0.0

    def timed(self, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc += time.perf_counter() - t

        return wrapper

    def counting(self, fn):
        def wrapper(*a, **k):
            ids, mask = fn(*a, **k)
            self.lengths.extend(int(x) for x in mask.sum(1).tolist())
            return ids, mask

        return wrapper

    def step_end(self):
        self.t.append(time.perf_counter())
        self.reward_s.append(self.acc)
        self.acc = 0.0


def instrument(mode: str, rec: Recorder):
    """Wrap TRL's reward computation (timer) and truncate_right (token counts) in its modules."""
    from trl.experimental.online_dpo import online_dpo_trainer as O
    from trl.experimental.xpo import xpo_trainer as X

    if mode == "xpo":
        X.get_reward = rec.timed(X.get_reward)
        X.truncate_right = rec.counting(X.truncate_right)
    else:
        O.OnlineDPOTrainer._calculate_rewards_from_functions = rec.timed(
            O.OnlineDPOTrainer._calculate_rewards_from_functions
        )
        O.truncate_right = rec.counting(O.truncate_right)


def build_trainer(spec: dict, rec: Recorder):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    mode = spec["mode"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    with open(os.path.join(spec["data"], "train.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # conversational prompts, so that TRL applies the chat template as our side does
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["scale"] * lora["rank"],
        lora_dropout=lora["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    # gradient checkpointing stays at its default (off); passing it only adds a deprecation warning
    common = dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["iters"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_new_tokens=spec["max_completion_length"],
        temperature=spec["temperature"],
        beta=[spec["beta"]],
        seed=spec["seed"],
        data_seed=spec["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()

    if mode == "xpo":
        from trl.experimental.xpo import XPOConfig as Config
        from trl.experimental.xpo import XPOTrainer as Trainer

        args = Config(alpha=[spec["alpha"]], **common)
        reward = tiny_reward_model(model.config.vocab_size, tok.pad_token_id, spec["seed"])
        more = {"reward_processing_classes": tok}
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig as Config
        from trl.experimental.online_dpo import OnlineDPOTrainer as Trainer

        args = Config(**common)
        reward = batched_reward(getattr(load_rules(spec["rules"]), spec.get("reward_function", "letter_e_reward")))
        more = {}
    return Trainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StepTimer()],
        **more,
    )


def main():
    spec = json.load(open(sys.argv[1]))
    out_path = sys.argv[2]
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl.experimental import online_dpo, xpo  # noqa: F401

    rss_after_imports_kb = proc_status_kb("VmRSS")
    t_imported = time.perf_counter()
    rec = Recorder()
    instrument(spec["mode"], rec)
    trainer = build_trainer(spec, rec)
    trainer.train()
    t_end = time.perf_counter()
    wall = [None] + [b - a for a, b in zip(rec.t, rec.t[1:])]
    steps = [
        {"iteration": i + 1, "wall_seconds": w, "reward_seconds": r} for i, (w, r) in enumerate(zip(wall, rec.reward_s))
    ]
    result = {
        "impl": "trl",
        "mode": spec["mode"],
        "spec": spec,
        "steps": steps,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": __import__("peft").__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "torch_blas": torch_blas(),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **run_facts(t_start, t_imported, t_end, rss_after_imports_kb, rec.t, rec.lengths),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
