"""How ditlab runs on the hardware: the distributed session, every precision rule (and the CPU bf16
probe), atomic file writes, and the derivation of every random stream's seed."""
