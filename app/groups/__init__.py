"""Token groups: which upstreams and models a group's tokens may use, and its price multiplier."""
