"""Training: the config (config), what is optimised (objectives, losses), the optimizer, the compiled train step
(step), the loop (loop), run directories and checkpoints (run_dir, checkpoints), metrics, the DPO reference
log-probs (dpo_reference), the memory planner (planner) and multi-host start-up (distributed). Nothing from
inference."""
