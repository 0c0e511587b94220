"""The running service: its long-lived parts opened and closed in order
(:mod:`app.runtime.services`), the one task each background part runs
(:mod:`app.runtime.background`), and the heap settings while it runs
(:mod:`app.runtime.heap`)."""
