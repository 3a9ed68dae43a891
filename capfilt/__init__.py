"""capfilt: BLIP's CapFilt (captioner + filter) as a library of Arrow-in, Arrow-out steps.

This package never imports ray: every step runs in a test, a plain loop or a Ray actor.
"""

__version__ = "0.1.0"
