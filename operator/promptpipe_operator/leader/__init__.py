"""Leader election, so several operator replicas are safe: the election on a Lease (`election`), the
Lease as the official client's resource lock (`lease_lock`), and the fence every write checks
(`write_fence`: whether this replica may write now)."""
