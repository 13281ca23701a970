"""What a request says, made ready for the model: messages checked (messages.py, no torch), media
planned from their headers and read within budgets (media.py), the prompt assembled piece by piece
with each media file processed once (prompt.py, prepare.py), the conversation fitted into the
window (context.py)."""
