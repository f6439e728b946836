"""The built-in tiny instruction model: its synthetic tasks (`tasks.py`), and later its tokenizer
and training (issue 9)."""
