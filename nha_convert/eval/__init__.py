"""Evaluation of base, NHA and baseline models: lm-eval tasks, recall probes, perplexity, speed, reports."""
