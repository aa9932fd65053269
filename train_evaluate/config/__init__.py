"""From the command line to a plan: the parser with its one-line errors, and the plan."""
