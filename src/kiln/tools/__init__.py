"""Command-line tools around the trainer: sweep, report, sample, code_eval, fits."""
