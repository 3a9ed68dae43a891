"""Ray actors and their placement. Thin: they hold library objects and call them."""
