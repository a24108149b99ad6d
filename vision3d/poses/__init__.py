"""Camera estimation for unposed images."""
