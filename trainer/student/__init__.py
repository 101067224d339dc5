"""The student: model, heads, losses, task tokens, and how it is built, saved and exported."""
