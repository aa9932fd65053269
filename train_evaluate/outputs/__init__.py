"""What a run writes: report rows and plots, packed checkpoints, the run folder."""
