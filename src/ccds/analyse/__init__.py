"""Analysis of selections and runs: what a subset is made of, and (later) fits and plans."""
