"""The data layer under the three stages: what conversion (`auto:K` calibration), fine-tuning and evaluation read.

Modules: sources (text sources and the one held-out rule), documents (the train / eval split of every passage, key
and answer, filler, the token-exact layout), retrieval (generated retrieval documents), cloze (a real passage asked
back in its own words), items (probe items: tokenisation, teacher-forced answers, grading),
synthetic (passkey and MQAR items), natural (natural-recall items: reading, code, restated), item_files (items of your own, `--recall-file`). Nothing here imports a stage
(convert, finetune, eval) or a command.
"""
