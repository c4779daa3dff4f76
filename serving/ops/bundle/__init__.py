"""The air-gap bundle: `build` (connected side) and `verify` (air-gapped side, standard library only)."""
