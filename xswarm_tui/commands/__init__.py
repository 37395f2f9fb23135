"""One module per command group; see ``xswarm_tui.cli``."""
