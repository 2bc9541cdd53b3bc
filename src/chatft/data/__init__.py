"""Chat data: source formats → `messages` rows (prep), chat templates, token ids + loss masks, batches."""
