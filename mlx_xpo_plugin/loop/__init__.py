"""The training loop: one step (trainer), the run around it (run_loop), data order, pairs, the pair
loss, evaluation, resumable state, faults and metrics."""
