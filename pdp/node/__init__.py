"""One ``pdp node`` process: the composition root (:mod:`.root`) wires the roles —
:mod:`.master` (run by the Raft leader), :mod:`.worker` (every member), :mod:`.gateway`
(the client-facing side) — each given the narrow services of :mod:`.services`, not the node;
plus the node's spool, map output files, owner limits and task progress files."""
