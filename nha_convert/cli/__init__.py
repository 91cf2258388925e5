"""Command-line entry points: nha-convert, nha-finetune, nha-eval."""
