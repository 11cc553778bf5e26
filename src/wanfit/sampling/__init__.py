"""wanfit.sampling."""
