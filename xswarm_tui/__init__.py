"""xswarm_tui"""
