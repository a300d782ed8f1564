"""What the user sees while gpt3d works: progress lines, quiet third-party imports, plots of a run's metrics."""
