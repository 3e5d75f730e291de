"""llmsample: generate text with language models and see how the sampling parameters shape it."""

__version__ = "0.1.0"
