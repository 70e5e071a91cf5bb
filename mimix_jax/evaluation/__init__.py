"""Evaluation of a trained model: perplexity on raw text (perplexity.py), and few-shot benchmark tasks scored
exactly as lm-evaluation-harness 0.4.13 scores them, run in JAX:

    tasks.py     the 8 tasks: hub schema, splits, lm-eval's doc processing and prompt templates, chance levels
    taskdata.py  reading a task's rows (DIR/NAME.jsonl | .parquet, or the hub through `datasets`), one-line errors
    prompts.py   few-shot sampling (lm-eval's ContextSampler, seeded) and the (context, continuation) requests
    encoding.py  requests -> token rows exactly as lm-eval's HFLM encodes them for `--model hf`
    metrics.py   acc, acc_norm (lm-eval's normalisation), LAMBADA's greedy match, the CORE aggregate
    scorer.py    the jitted, mesh-sharded log-likelihood scorer: contexts shared as trees, packed rows (the
                 only module that imports the model)
    runner.py    prepare() + run() = evaluate_tasks(): what the evaluate command and the training loop call

Nothing here imports jax except scorer.py and perplexity.py, so the task definitions can be
used and tested without a model.
"""
