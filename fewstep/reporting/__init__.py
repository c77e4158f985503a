"""The static HTML report of an experiment: tables (arrows, CIs, paired differences against the
teacher and against DMD2, leakage marks), plots (quality against NFE, against measured latency,
training cost), and sample grids of the same prompts and seeds across methods. Everything is
generated from the score files and the sample sets; nothing is edited by hand."""
