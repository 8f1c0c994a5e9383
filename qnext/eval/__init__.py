"""Quality measurements: perplexity (ppl.py) and function-body completion (complete.py)."""
