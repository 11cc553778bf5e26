"""wanfit.hardware."""
