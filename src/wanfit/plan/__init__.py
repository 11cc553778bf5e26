"""wanfit.plan."""
