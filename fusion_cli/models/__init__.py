"""FusionMamba (fusionmamba.py), its selective-scan backends (scan.py), the registry of named models
(registry.py) and the fuser that runs one in the tiled pipeline (fuser.py)."""

# Scan memory (tokens) of the shipped networks and the `fusion train` default: tiles of the default size
# and halo then match the one-piece output within 1 DN (bench/bench_seam.py), while the held-out metrics
# of the shipped models moved by <= 0.01 (Q2n, SAM degrees, ERGAS) against their unbounded scans.
# Kept here, free of torch, so that the CLI can show it as a default without importing the network.
SEAMLESS_SCAN_MEMORY = 20.0
