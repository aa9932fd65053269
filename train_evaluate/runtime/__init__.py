"""What every part of a run leans on: atomic files and digests, progress bars, Ctrl-C, errors."""
