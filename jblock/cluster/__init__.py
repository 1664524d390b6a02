"""The cluster: membership and health of workers, placement, the coordinator's side of workers
(jblock.cluster.remote), and recovery from their failures."""
