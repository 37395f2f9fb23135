"""Voice models behind one slot-based interface (see ``base``). torch, moshi and mlx are
imported only inside this package, lazily, and never on the UI thread."""
