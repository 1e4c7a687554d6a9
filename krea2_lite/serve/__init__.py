"""`python -m krea2_lite serve`: an HTTP image service on Ray Serve (see app.py, docs/ray.md)."""
