"""Reports on run folders: tables against the published figures, seed sweeps, plots, attention maps, export."""
