"""Example models and the demo: tools around the backend, not part of it (the backend never imports them)."""
