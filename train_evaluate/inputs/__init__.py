"""What a run reads: the backbone, its cached features and images, the cut, the demo's data."""
