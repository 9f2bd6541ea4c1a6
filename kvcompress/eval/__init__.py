"""Evaluation: `metrics` (plain-PyTorch metric and size helpers), `end_of_run` (the evaluation every run
records after training) and `cli` (`python -m kvcompress.eval ckpt_path=...`, the same numbers for a
checkpoint, a run folder or a Hugging Face folder)."""
