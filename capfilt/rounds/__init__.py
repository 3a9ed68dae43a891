"""A round folder: its layout and atomic writes, its check, its diff with another round, and views
for trainers.
"""
