"""Speed and memory: tok/s sweeps, MTP speed, the decode roofline, imported bench output."""
