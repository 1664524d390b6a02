"""The cluster: membership and health of workers, and recovery from their failures."""
