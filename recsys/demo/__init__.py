"""The embedded demo data sets: ctr (a Criteo-like CTR set) and interactions (for two-tower)."""
