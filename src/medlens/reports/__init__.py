"""Reports: the evaluation report, per-study reports, and the HTML pieces they share."""
