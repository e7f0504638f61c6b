"""Rendering a run: the HTML page (one Jinja template), findings, heatmaps, summary.json."""
