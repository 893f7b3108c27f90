"""Everything pysyncobj: the replicated state behind a Raft group (:mod:`.consensus`), its
durable journal (:mod:`.durable`), a pickle-free codec and transport (:mod:`.raftnet`) and
the bridge that carries Raft messages over the members' pdp connections (:mod:`.raftlink`)."""
