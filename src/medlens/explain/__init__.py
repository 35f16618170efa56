"""Explanations: CAM heatmaps by name, overlays, and localisation scores against boxes and masks."""
