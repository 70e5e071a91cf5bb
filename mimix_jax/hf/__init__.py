"""Hugging Face (and original MimixLM) formats: tensor names and layouts (layout), configs (configs), the
tokenizer as tokenizer.json and a Jinja chat template (tokenizer), the directory's files (files) and the logit
check of an export against ours (verify). NumPy only: no JAX, nothing from training."""
