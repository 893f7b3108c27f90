"""The pure core: the replicated state machine, the scheduler's placement policy, the
master's lease decisions, input splitting and the authorization table. No sockets, no
clocks, no asyncio: every function takes the time it needs and returns a decision, so it is
tested in milliseconds and replayed deterministically by every Raft member."""
