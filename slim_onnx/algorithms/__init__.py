"""Per-layer compression algorithms (quantizers, 2:4 masks, low-rank adapters)."""

# Steps that act on each output column alone (GPTQ, the whitening of the adapters' error, the error
# reports) run over this many columns at a time, so that their float32 working copies stay
# K x COLUMN_CHUNK: 128 MiB at K = 4096, even for a 4096 x 128256 lm_head.
COLUMN_CHUNK = 8192
