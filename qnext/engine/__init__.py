"""Engine: per-step batch, scheduler, runner, sampler and the engine loops."""
