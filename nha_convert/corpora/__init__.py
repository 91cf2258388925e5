"""Data below the stages: text sources, documents and probe items shared by conversion, fine-tuning and evaluation."""
