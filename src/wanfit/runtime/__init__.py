"""wanfit.runtime."""
