"""Offline evaluation tasks (mteb custom tasks over real data from registry packages)."""
