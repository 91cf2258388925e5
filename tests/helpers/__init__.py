"""Helpers shared by the test modules (no tests here): tiny models, batches, fine-tuning fixtures."""
