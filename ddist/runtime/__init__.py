"""Runtime plumbing: the RunContext, threads, the CPU allocator, torchrun ranks, shards, work
directories, multirun bookkeeping, shard assembly (`python -m ddist.runtime.merge`) and artifacts on disk."""
