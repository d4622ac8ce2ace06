"""Gateway tokens: issue, hash, authenticate, revoke."""
