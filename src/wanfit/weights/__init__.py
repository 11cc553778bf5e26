"""wanfit.weights."""
