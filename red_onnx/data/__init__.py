"""The bundled demo model and its held-out test split (written by ``models/train_digits.py``)."""
