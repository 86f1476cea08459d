"""Studies: many models trained and measured with narrowgate's own experiments to answer one question.

``emergence``: when does a narrow gate emerge? (``narrowgate study emergence``; docs/study-emergence.md).
"""
