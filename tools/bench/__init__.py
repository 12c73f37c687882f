"""`shadowblk bench`: figures of shadowblk beside its peers, in one run."""
