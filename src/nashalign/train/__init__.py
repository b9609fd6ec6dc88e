"""One optimization phase on accelerate: the loop, reference scoring, checkpoints."""
