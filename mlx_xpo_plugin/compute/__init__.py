"""The model work: sampling (rollout, decode), completion log-probs (scoring), the reference, where a
model setting points (models) and quantized checkpoints."""
