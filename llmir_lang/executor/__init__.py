"""The embedded engine: model, KV pool, radix cache, scheduler, sampler."""
