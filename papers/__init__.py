"""One folder per paper; each runs as `python -m papers.<slug> {train,eval,reproduce}`."""
