"""The inference engine: sampling, paged KV cache, continuous-batching scheduler, streaming."""
