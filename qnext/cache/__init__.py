"""KV pages, GDN state slots and the tensors behind them (model_cache.ModelCache)."""
