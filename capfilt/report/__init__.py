"""The round report: one HTML file with its plots and its calibration and parent-diff sections."""
