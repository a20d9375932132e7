"""noduleflow: forecast how a lung nodule will look at a follow-up chest CT."""

__version__ = "0.1.0"
