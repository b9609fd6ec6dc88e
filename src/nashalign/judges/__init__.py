"""Preference oracles (the protocol, its implementations, the registry) and pair construction."""
